/**
 * The client against a sandboxed server with API keys on: bearer key, signed links, quotas with Retry-After; and
 * the committed types against this server's OpenAPI document (the one `npm run generate` reads: keys on).
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { after, before, test } from "node:test";

import { startServer, type RunningServer } from "../scripts/mvserver.ts";
import { fetchDocument, GENERATED_FILE, typesFromDocument } from "../scripts/openapi.ts";
import { createMvClient, MvApiError, type JobEvent } from "../src/index.ts";
import { assertEveryEventOnce, droppingFetch, recordingFetch } from "./helpers.ts";

let server: RunningServer;
const UNKNOWN_JOB = "3f2b8a3e-9a5c-4d7e-8b1a-2c3d4e5f6a7b";

before(async () => {
  // one job token every 2 s, no burst: the quota test meets a 429 for sure
  server = await startServer({ keys: { jobsPerMinute: 30, jobsBurst: 1 } });
});

after(async () => {
  await server?.stop();
  assert.doesNotMatch(server?.log() ?? "", /Traceback/);
});

async function failure(promise: Promise<unknown>): Promise<MvApiError> {
  const caught = await promise.then(() => assert.fail("no error"), (error: unknown) => error);
  assert.ok(caught instanceof MvApiError, String(caught));
  return caught;
}

test("without a key health says one is required, and other calls are 401", async () => {
  const anonymous = createMvClient({ baseUrl: server.url });
  assert.equal((await anonymous.health()).auth.keys_required, true);
  const missing = await failure(anonymous.getJob(UNKNOWN_JOB));
  assert.deepEqual([missing.status, missing.code], [401, "auth_required"]);
  const wrong = createMvClient({ baseUrl: server.url, apiKey: "mv_k0000000000000_wrong" });
  assert.equal((await failure(wrong.getJob(UNKNOWN_JOB))).code, "invalid_api_key");
});

test("a job followed through the signed link of the multi-job stream, and its video loaded without the key",
  async () => {
    const recorder = recordingFetch(droppingFetch(2));
    const mv = createMvClient({ baseUrl: server.url, apiKey: () => server.apiKey, fetch: recorder.fetch });
    const { job } = await mv.generateVideo({ prompt: "She boards the night bus instead." });
    assert.match(job.signed_urls?.events_url ?? "", /[?&]sig=/);
    const events: JobEvent[] = [];
    const final = await mv.followJob(job, { signedLink: true, reconnectDelayMs: 50,
      onUpdate: (_job, event) => event && events.push(event) });
    assert.equal(final.status, "succeeded");
    assertEveryEventOnce(events, [job.job_id]);

    const links = recorder.sent.filter((sent) => sent.url.includes("/api/mv/events/link?"));
    assert.equal(links.length, 1, "one link serves the reconnect too");
    assert.match(links[0]?.headers.get("Authorization") ?? "", /^Bearer mv_/);
    const streams = recorder.sent.filter((sent) => sent.url.includes("/api/mv/events?"));
    assert.equal(streams.length, 2);
    for (const stream of streams) {
      assert.match(stream.url, /[?&]kid=.+&exp=\d+&sig=/);
      assert.equal(stream.headers.get("Authorization"), null, "the key does not travel with the stream");
    }
    assert.equal(streams[1]?.headers.get("Last-Event-ID"), "2");

    const videoUrl = mv.linkFor(await mv.getJob(job.job_id), "video_url") ?? "";
    assert.match(videoUrl, /[?&]sig=/);
    const video = await fetch(videoUrl);
    assert.deepEqual([video.status, video.headers.get("Content-Type")], [200, "video/mp4"]);
    assert.equal((await video.arrayBuffer()).byteLength, final.video_bytes);
    const tampered = await MvApiError.fromResponse(await fetch(videoUrl.replace(/sig=./, "sig=A")));
    assert.deepEqual([tampered.status, tampered.code], [403, "invalid_signature"]);
  });

test("429 rate_limited carries Retry-After; a start is repeated after it with the same Idempotency-Key",
  async () => {
    const recorder = recordingFetch();
    const mv = createMvClient({ baseUrl: server.url, apiKey: server.apiKey, fetch: recorder.fetch });
    const first = await mv.generateVideo({ prompt: "Platform 1." }); // waits for a token if the bucket is empty
    const refused = await failure(mv.generateVideo({ prompt: "Platform 2." }, { retry: { retries: 0 } }));
    assert.deepEqual([refused.status, refused.code], [429, "rate_limited"]);
    assert.ok((refused.retryAfter ?? 0) >= 1, `Retry-After ${refused.retryAfter}`);

    const sentBefore = recorder.sent.length;
    const second = await mv.generateVideo({ prompt: "Platform 2." });
    const attempts = recorder.sent.slice(sentBefore);
    assert.deepEqual(attempts.map((sent) => sent.status), [429, 202]);
    assert.equal(attempts[0]?.headers.get("Idempotency-Key"), second.idempotencyKey);
    assert.equal(attempts[1]?.headers.get("Idempotency-Key"), second.idempotencyKey);
    const waited = (attempts[1]?.at ?? 0) - (attempts[0]?.at ?? 0);
    assert.ok(waited >= 950, `waited ${waited} ms`);
    await Promise.all([first, second].map(({ job }) => mv.cancelJob(job.job_id)));
  });

test("src/generated/openapi.ts is what the current server's OpenAPI document generates", async () => {
  const [expected, committed] = await Promise.all([typesFromDocument(await fetchDocument(server)),
    readFile(GENERATED_FILE, "utf8")]);
  if (committed === expected) return;
  const want = expected.split("\n");
  const have = committed.split("\n");
  const line = want.findIndex((text, index) => text !== have[index]);
  assert.fail("src/generated/openapi.ts is out of date: run `npm run generate` in clients/typescript.\n"
    + `First difference at line ${line + 1}:\n  committed: ${have[line] ?? "(end of file)"}\n`
    + `  generated: ${want[line] ?? "(end of file)"}`);
});
