/** The client against a real sandboxed `python -m mvserver` (keys off). */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { startServer, type RunningServer } from "../scripts/mvserver.ts";
import { createMvClient, MvApiError, type JobEvent, type JobState, type MvClient,
  type ReconnectInfo } from "../src/index.ts";
import { assertEveryEventOnce, droppingFetch, noStreamFetch, recordingFetch } from "./helpers.ts";

let server: RunningServer;
let mv: MvClient;
const UNKNOWN_ID = "3f2b8a3e-9a5c-4d7e-8b1a-2c3d4e5f6a7b";
const CHARACTER = "a woman with short silver hair, round glasses and a yellow raincoat";

before(async () => {
  server = await startServer({ videoSeconds: 3 });
  mv = createMvClient({ baseUrl: server.url });
});

after(async () => {
  await server?.stop();
  assert.doesNotMatch(server?.log() ?? "", /Traceback/);
});

function collect(): { events: JobEvent[]; polled: JobState[]; onUpdate: (job: JobState, event?: JobEvent) => void } {
  const events: JobEvent[] = [];
  const polled: JobState[] = [];
  return { events, polled, onUpdate: (job, event) => (event ? events.push(event) : polled.push(job)) };
}

// The tests are independent (each has its own jobs and fetch): they run at once, as a page's calls would.
describe("the client against a sandboxed server (keys off)", { concurrency: true }, () => {
  test("scenes: written, and readable from their URL", async () => {
    const scenes = await mv.createScenes({ idea: "missing the last train home", character_description: CHARACTER,
      number_of_scenes: 2 });
    assert.equal(scenes.scenes.length, 2);
    assert.match(scenes.scenes[0]?.description ?? "", /^\[sandbox\]/);
    const saved = await (await fetch(mv.url(scenes.urls.json))).json() as { scenes_id: string };
    assert.equal(saved.scenes_id, scenes.scenes_id);
  });

  test("a character image: inline and at its URL, the same PNG", async () => {
    const image = await mv.generateCharacterReference({ character_description: CHARACTER });
    assert.equal(image.mime_type, "image/png");
    const inline = Buffer.from(image.image_base64, "base64");
    assert.deepEqual([...inline.subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47]);
    const served = Buffer.from(await (await fetch(mv.linkFor(image, "image_url") as string)).arrayBuffer());
    assert.ok(served.equals(inline));
  });

  test("a video job followed over its stream to the end, then downloaded", async () => {
    const { job } = await mv.generateVideo({ prompt: "She runs for the last train on a rainy platform." });
    assert.equal(job.status, "queued");
    const { events, polled, onUpdate } = collect();
    const final = await mv.followJob(job, { onUpdate });
    assert.equal(final.status, "succeeded");
    assert.equal(final.stage, "done");
    assertEveryEventOnce(events, [job.job_id]);
    assert.ok(events.some((event) => event.name === "progress"), "progress events");
    assert.equal(polled.length, 0);
    const video = await fetch(mv.linkFor(final, "video_url") as string);
    assert.equal(video.headers.get("Content-Type"), "video/mp4");
    assert.equal((await video.arrayBuffer()).byteLength, final.video_bytes);
  });

  test("a stream dropped in the middle of an event resumes after the last whole one: none missed, none repeated",
    async () => {
      const recorder = recordingFetch(droppingFetch(2));
      const client = createMvClient({ baseUrl: server.url, fetch: recorder.fetch });
      const { job } = await client.generateVideo({ prompt: "The train doors close in front of her." });
      const { events, onUpdate } = collect();
      const reconnects: ReconnectInfo[] = [];
      const final = await client.followJob(job.job_id, { onUpdate, onReconnect: (info) => reconnects.push(info),
        reconnectDelayMs: 50 });
      assert.equal(final.status, "succeeded");
      assertEveryEventOnce(events, [job.job_id]);
      assert.ok(events.length > 3, `${events.length} events`);
      const streams = recorder.sent.filter((sent) => sent.url.endsWith("/events"));
      assert.deepEqual(streams.map((sent) => sent.headers.get("Last-Event-ID")), [null, "2"]);
      assert.equal(reconnects.length, 1);
      assert.equal(reconnects[0]?.lastEventId, "2");
      assert.equal((reconnects[0]?.error as MvApiError).code, "network_error");
    });

  test("several jobs on one stream, dropped and resumed with every job's position", async () => {
    const recorder = recordingFetch(droppingFetch(3));
    const client = createMvClient({ baseUrl: server.url, fetch: recorder.fetch });
    const started = await Promise.all(["A wide shot of the platform.", "A close-up of the departures board."]
      .map((prompt) => client.generateVideo({ prompt })));
    const ids = started.map(({ job }) => job.job_id);
    const { events, onUpdate } = collect();
    const finals = await client.followJobs(started.map(({ job }) => job), { onUpdate, reconnectDelayMs: 50 });
    assert.deepEqual(finals.map((job) => [job.job_id, job.status]), ids.map((id) => [id, "succeeded"]));
    assertEveryEventOnce(events, ids);
    const streams = recorder.sent.filter((sent) => sent.url.includes("/api/mv/events?"));
    assert.equal(streams.length, 2);
    assert.equal(streams[0]?.headers.get("Last-Event-ID"), null);
    const resumedAt = streams[1]?.headers.get("Last-Event-ID") ?? "";
    assert.equal(resumedAt, events[2]?.id, "resumed after the third event, the last whole one");
    assert.match(resumedAt, /^\d+\.\d+$/);
  });

  test("polling takes over when no stream can be had", async () => {
    const client = createMvClient({ baseUrl: server.url, fetch: noStreamFetch() });
    const { job } = await client.generateVideo({ prompt: "Rain on the empty tracks." });
    const { events, polled, onUpdate } = collect();
    const reconnects: ReconnectInfo[] = [];
    const final = await client.followJob(job, { onUpdate, onReconnect: (info) => reconnects.push(info),
      maxReconnects: 1, reconnectDelayMs: 20, pollIntervalMs: 250 });
    assert.equal(final.status, "succeeded");
    assert.equal(events.length, 0);
    assert.equal(polled.at(-1)?.status, "succeeded");
    assert.ok(polled.length >= 2, `${polled.length} polled states`);
    assert.deepEqual(reconnects.map((info) => info.polling), [false, true]);
  });

  test("cancel: the job stops and its stream ends with a canceled event", async () => {
    const { job } = await mv.generateVideo({ prompt: "She waits on the bench." });
    const { events, onUpdate } = collect();
    const following = mv.followJob(job, { onUpdate });
    const canceled = await mv.cancelJob(job.job_id);
    assert.equal(canceled.status, "canceled");
    assert.equal(canceled.error?.code, "job_canceled");
    const final = await following;
    assert.equal(final.status, "canceled");
    assert.equal(events.at(-1)?.name, "canceled");
    assertEveryEventOnce(events, [job.job_id]);
  });

  test("a 400 is a typed error naming its field, and is not retried", async () => {
    const recorder = recordingFetch();
    const client = createMvClient({ baseUrl: server.url, fetch: recorder.fetch });
    const error = await client.createScenes({ idea: "x", character_description: "y", number_of_scenes: 50 })
      .then(() => assert.fail("no error"), (caught: unknown) => caught);
    assert.ok(error instanceof MvApiError);
    assert.equal(error.status, 400);
    assert.equal(error.code, "invalid_field");
    assert.equal(error.field, "number_of_scenes");
    assert.match(error.message, /number_of_scenes/);
    assert.equal(recorder.sent.length, 1);

    const missing = await client.generateVideo({ prompt: "x", reference_image_id: UNKNOWN_ID })
      .then(() => assert.fail("no error"), (caught: unknown) => caught as MvApiError);
    assert.deepEqual([missing.status, missing.code, missing.field], [404, "not_found", "reference_image_id"]);

    const unknownJob = await client.followJob(UNKNOWN_ID)
      .then(() => assert.fail("no error"), (caught: unknown) => caught as MvApiError);
    assert.deepEqual([unknownJob.status, unknownJob.code], [404, "not_found"]);
  });

  test("waiting for a job gives up after timeoutMs", async () => {
    const { job } = await mv.generateVideo({ prompt: "A long night." });
    const started = Date.now();
    const error = await mv.waitForJob(job, { timeoutMs: 300 })
      .then(() => assert.fail("no error"), (caught: unknown) => caught as Error);
    assert.equal(error.name, "TimeoutError");
    assert.ok(Date.now() - started < 2500, "well before the job's end");
    assert.equal((await mv.cancelJob(job.job_id)).status, "canceled");
  });

  test("a job start whose answer was lost is retried with its Idempotency-Key: one job, the first answer", async () => {
    let lost: string | undefined;
    const losing: typeof fetch = async (input, init) => {
      const response = await fetch(input, init);
      if (lost === undefined && response.status === 202) {
        lost = ((await response.json()) as { job_id: string }).job_id;
        throw new TypeError("fetch failed", { cause: new Error("socket hang up") });
      }
      return response;
    };
    const recorder = recordingFetch(losing);
    const client = createMvClient({ baseUrl: server.url, fetch: recorder.fetch, retry: { backoffMs: 10 } });
    const body = { prompt: "The last train leaves without her." };
    const first = await client.generateVideo(body);
    assert.equal(first.job.job_id, lost, "the job the lost answer created");
    assert.equal(first.replayed, true);
    const keys = recorder.sent.map((sent) => sent.headers.get("Idempotency-Key"));
    assert.deepEqual(keys, [first.idempotencyKey, first.idempotencyKey]);

    const again = await client.generateVideo(body, { idempotencyKey: first.idempotencyKey });
    assert.deepEqual([again.job.job_id, again.replayed], [lost, true]);

    const reused = await client.generateVideo({ prompt: "Another prompt." }, { idempotencyKey: first.idempotencyKey })
      .then(() => assert.fail("no error"), (caught: unknown) => caught as MvApiError);
    assert.deepEqual([reused.status, reused.code, reused.field], [422, "idempotency_key_reused", "Idempotency-Key"]);
    assert.equal(recorder.sent.length, 4, "the 422 is not retried");

    const fresh = await client.generateVideo(body);
    assert.notEqual(fresh.job.job_id, lost);
    assert.equal(fresh.replayed, false);
    await Promise.all([lost as string, fresh.job.job_id].map((id) => client.cancelJob(id)));
  });

  test("a 503 with Retry-After is waited for, then repeated", async () => {
    let refusals = 0;
    const busy: typeof fetch = async (input, init) => {
      if (refusals++ === 0) {
        return Response.json({ error: { code: "store_unavailable", message: "the job store is unreachable" } },
          { status: 503, headers: { "Retry-After": "1" } });
      }
      return fetch(input, init);
    };
    const recorder = recordingFetch(busy);
    const client = createMvClient({ baseUrl: server.url, fetch: recorder.fetch });
    const health = await client.health();
    assert.equal(health.status, "ok");
    assert.equal(recorder.sent.length, 2);
    const waited = (recorder.sent[1]?.at ?? 0) - (recorder.sent[0]?.at ?? 0);
    assert.ok(waited >= 950, `waited ${waited} ms`);

    refusals = 0;
    const error = await client.health({ retry: { retries: 0 } })
      .then(() => assert.fail("no error"), (caught: unknown) => caught as MvApiError);
    assert.deepEqual([error.status, error.code, error.retryAfter, error.transient],
      [503, "store_unavailable", 1, true]);
  });
});
