/**
 * Server-Sent Events over `fetch`: works in browsers and Node 20 alike, and, unlike a browser's EventSource, can
 * send `Authorization` and `Last-Event-ID` itself.
 */
import { createParser, type EventSourceMessage } from "eventsource-parser";

export type { EventSourceMessage };

/**
 * The events of a `text/event-stream` body, in order. An event is yielded only once its closing blank line has
 * arrived, so a connection that breaks in the middle of an event never yields half of it. `onRetry` gets the
 * server's `retry:` hint. Leaving the loop early (or an error) cancels the body, which closes the connection.
 */
export async function* readEventStream(body: ReadableStream<Uint8Array>, onRetry?: (ms: number) => void
): AsyncGenerator<EventSourceMessage, void, undefined> {
  const queue: EventSourceMessage[] = [];
  const parser = createParser({ onEvent: (event) => queue.push(event), onRetry });
  const reader = body.getReader();
  const decoder = new TextDecoder();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      parser.feed(decoder.decode(value, { stream: true }));
      while (queue.length > 0) yield queue.shift() as EventSourceMessage;
    }
  } finally {
    reader.cancel().catch(() => undefined);
  }
}
