/** Fetch wrappers for the tests: record what the client sends, break a stream in the middle of an event. */
import assert from "node:assert/strict";

import type { JobEvent } from "../src/index.ts";

export interface Sent {
  method: string;
  url: string;
  headers: Headers;
  status?: number;
  at: number;
}

/** A fetch that records every request (and its answer's status) in `sent`. */
export function recordingFetch(inner: typeof fetch = fetch): { fetch: typeof fetch; sent: Sent[] } {
  const sent: Sent[] = [];
  const wrapped: typeof fetch = async (input, init) => {
    const request = new Request(input, init);
    const entry: Sent = { method: request.method, url: request.url, headers: request.headers, at: Date.now() };
    sent.push(entry);
    const response = await inner(request);
    entry.status = response.status;
    return response;
  };
  return { fetch: wrapped, sent };
}

function isStream(response: Response): boolean {
  return (response.headers.get("Content-Type") ?? "").startsWith("text/event-stream");
}

/**
 * A fetch whose first `times` event streams break like a lost connection: the body passes `events` whole events
 * and half of the next one, then fails with the error a broken socket gives, and the real connection is closed.
 */
export function droppingFetch(events: number, times = 1, inner: typeof fetch = fetch): typeof fetch {
  let dropped = 0;
  return async (input, init) => {
    const response = await inner(input, init);
    if (!isStream(response) || response.body === null || dropped >= times) return response;
    dropped++;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const encoder = new TextEncoder();
    let text = "";
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        const { done, value } = await reader.read();
        if (done) {
          controller.close();
          return;
        }
        const before = text.length;
        text += decoder.decode(value, { stream: true });
        const ends = [...text.matchAll(/\r\n\r\n|\n\n|\r\r/g)]
          .map((match) => (match.index as number) + match[0].length); // aiohttp-sse ends lines with \r\n
        if (ends.length <= events) {
          controller.enqueue(encoder.encode(text.slice(before)));
          return;
        }
        // up to the end of event `events`, then half of the next one
        const cut = (ends[events - 1] ?? 0) + Math.floor(((ends[events] as number) - (ends[events - 1] ?? 0)) / 2);
        controller.enqueue(encoder.encode(text.slice(before, Math.max(before, cut))));
        await reader.cancel();
        controller.error(new TypeError("terminated", { cause: new Error("other side closed") }));
      },
      cancel: () => reader.cancel(),
    });
    return new Response(body, { status: response.status, statusText: response.statusText, headers: response.headers });
  };
}

/** A fetch that refuses every event stream as a network error (a proxy that cannot pass them on, say). */
export function noStreamFetch(inner: typeof fetch = fetch): typeof fetch {
  return async (input, init) => {
    const headers = input instanceof Request ? input.headers : new Headers(init?.headers);
    const accept = headers.get("Accept") ?? "";
    if (accept.includes("text/event-stream")) throw new TypeError("fetch failed", { cause: new Error("ECONNRESET") });
    return inner(input, init);
  };
}

/** Each job's events were delivered once each and in order, from its first (1) to its final one. */
export function assertEveryEventOnce(events: JobEvent[], jobIds: string[]): void {
  for (const jobId of jobIds) {
    const mine = events.filter((event) => event.jobId === jobId);
    assert.deepEqual(mine.map((event) => event.position), mine.map((_, index) => index + 1),
      `job ${jobId}: positions ${mine.map((event) => event.position).join(",")}`);
    assert.equal(mine[0]?.name, "queued");
    assert.ok(["succeeded", "failed", "canceled"].includes(mine.at(-1)?.name ?? ""), `last: ${mine.at(-1)?.name}`);
  }
}
