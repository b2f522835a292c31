/**
 * Following jobs to their end: one job's stream (`/api/mv/jobs/{id}/events`) or several jobs on one connection
 * (`/api/mv/events?jobs=...`), resumed with `Last-Event-ID` after a dropped connection, with polling of
 * `GET /api/mv/jobs/{id}` when the stream cannot be had.
 */
import { MvApiError } from "./errors.js";
import { sleep } from "./retry.js";
import { readEventStream, type EventSourceMessage } from "./sse.js";
import { isFinalStatus, JOB_EVENT_NAMES, type EventsLink, type JobEvent, type JobEventName,
  type JobState } from "./types.js";

export interface FollowOptions {
  /** Every new state of a job, merged from its events (`job = {...job, ...event.data}`). `event` is the SSE event it
   * came from (each delivered once, in order), undefined when the state came from polling. */
  onUpdate?: (job: JobState, event: JobEvent | undefined) => void;
  /** Before each reconnect (the stream dropped, ended early or was refused) and when polling takes over. */
  onReconnect?: (info: ReconnectInfo) => void;
  signal?: AbortSignal;
  /** Give up after this many milliseconds (rejects with the timeout's `TimeoutError`). */
  timeoutMs?: number;
  /** Resume an earlier session after this event (a `JobEvent.id` of the same job list). */
  lastEventId?: string;
  /** `poll` skips the stream and polls `GET /api/mv/jobs/{id}`. Default `sse`. */
  transport?: "sse" | "poll";
  /** Wait before reconnecting; default the server's `retry:` hint (3000 ms). */
  reconnectDelayMs?: number;
  /** Reconnects in a row that bring no event before polling takes over (default 5). */
  maxReconnects?: number;
  /** Polling interval (default 3000 ms). */
  pollIntervalMs?: number;
  /** Open the multi-job stream through the URL of `GET /api/mv/events/link` (signed for the key when keys are on)
   * instead of sending the key on the stream; a new link is fetched when the old one expires. */
  signedLink?: boolean;
}

export interface ReconnectInfo {
  /** Reconnects in a row without an event so far (1 for the first). */
  attempt: number;
  /** What the next connection sends as `Last-Event-ID`. */
  lastEventId: string | undefined;
  /** Why the last connection ended (undefined: the server ended it before the jobs ended). */
  error: unknown;
  /** True once polling has taken over from the stream. */
  polling: boolean;
}

/** What the follower needs from the client. */
export interface FollowContext {
  fetch: typeof fetch;
  url(path: string): string;
  authHeaders(): Record<string, string>;
  getJob(jobId: string, signal?: AbortSignal): Promise<JobState>;
  eventsLink(jobIds: string[], signal?: AbortSignal): Promise<EventsLink>;
}

const DEFAULT_RETRY_MS = 3000;

export class JobFollower {
  private readonly states: JobState[];
  private readonly positions: number[];
  private readonly finished: boolean[];
  private retryMs = DEFAULT_RETRY_MS;
  private polling: boolean;
  private link: string | undefined;
  private readonly signal: AbortSignal | undefined;

  constructor(private readonly context: FollowContext, private readonly jobIds: string[],
    private readonly options: FollowOptions, seeds: (Partial<JobState> | undefined)[] = []) {
    if (jobIds.length === 0) throw new TypeError("follow at least one job");
    this.states = jobIds.map((id, i) => ({ status: "queued", ...seeds[i], job_id: id }));
    this.positions = parsePositions(options.lastEventId, jobIds.length) ?? jobIds.map(() => 0);
    this.finished = this.states.map((state) => isFinalStatus(state.status));
    this.polling = options.transport === "poll";
    this.signal = withTimeout(options.signal, options.timeoutMs);
  }

  /** Follow until every job has ended; the final states, in the order of the job ids. */
  async run(): Promise<JobState[]> {
    let failures = 0;
    while (!this.done()) {
      if (this.polling) {
        await this.poll();
        break;
      }
      let received = 0;
      let error: unknown;
      try {
        received = await this.connect();
      } catch (caught) {
        this.throwIfAborted();
        if (!(caught instanceof MvApiError) || !(caught.transient || this.linkExpired(caught))) throw caught;
        error = caught;
      }
      if (this.done() || this.polling) continue;
      failures = received > 0 ? 1 : failures + 1;
      if (received === 0 && error === undefined) {
        await this.pollRound(); // the stream ended with no news: the jobs may have ended out of sight
        if (this.done()) break;
      }
      if (failures > (this.options.maxReconnects ?? 5)) {
        this.polling = true;
        this.options.onReconnect?.({ attempt: failures, lastEventId: this.lastEventId(), error, polling: true });
        continue;
      }
      this.options.onReconnect?.({ attempt: failures, lastEventId: this.lastEventId(), error, polling: false });
      const retryAfter = error instanceof MvApiError && error.retryAfter !== undefined ? error.retryAfter * 1000 : 0;
      await sleep(Math.max(retryAfter, this.options.reconnectDelayMs ?? this.retryMs), this.signal);
    }
    return this.states.map((state) => ({ ...state }));
  }

  private done(): boolean {
    return this.finished.every(Boolean);
  }

  private lastEventId(): string | undefined {
    return this.positions.some((position) => position > 0) ? this.positions.join(".") : undefined;
  }

  private linkExpired(error: MvApiError): boolean {
    return Boolean(this.options.signedLink) && error.status === 403
      && (error.code === "signature_expired" || error.code === "invalid_signature");
  }

  private throwIfAborted(): void {
    if (this.signal?.aborted) throw this.signal.reason;
  }

  /** One connection: the events it brought (0 when it brought none). */
  private async connect(): Promise<number> {
    const headers: Record<string, string> = { Accept: "text/event-stream" };
    let url: string;
    if (this.options.signedLink) {
      this.link ??= this.context.url((await this.context.eventsLink(this.jobIds, this.signal)).events_url);
      url = this.link;
    } else {
      Object.assign(headers, this.context.authHeaders());
      url = this.context.url(this.jobIds.length === 1
        ? `/api/mv/jobs/${encodeURIComponent(this.jobIds[0] as string)}/events`
        : `/api/mv/events?jobs=${this.jobIds.map(encodeURIComponent).join(",")}`);
    }
    const lastEventId = this.lastEventId();
    if (lastEventId !== undefined) headers["Last-Event-ID"] = lastEventId;
    let response: Response;
    try {
      response = await this.context.fetch(url, this.signal ? { headers, signal: this.signal } : { headers });
    } catch (error) {
      this.throwIfAborted();
      throw MvApiError.network(error);
    }
    if (!response.ok) {
      const error = await MvApiError.fromResponse(response);
      if (this.linkExpired(error)) this.link = undefined;
      throw error;
    }
    if (!(response.headers.get("Content-Type") ?? "").startsWith("text/event-stream") || response.body === null) {
      await response.body?.cancel();
      this.polling = true; // something in between does not pass the stream on
      this.options.onReconnect?.({ attempt: 0, lastEventId, error: undefined, polling: true });
      return 0;
    }
    let received = 0;
    try {
      for await (const message of readEventStream(response.body, (ms) => { this.retryMs = ms; })) {
        if (this.apply(message)) received++;
        if (this.done()) break;
      }
    } catch (error) {
      this.throwIfAborted();
      if (error instanceof MvApiError) throw error;
      throw MvApiError.network(error, "the event stream broke");
    }
    return received;
  }

  /** Apply one SSE event; false for one already seen (or not a job event). */
  private apply(message: EventSourceMessage): boolean {
    const name = message.event as JobEventName | undefined;
    if (name === undefined || !JOB_EVENT_NAMES.includes(name)) return false;
    const data = JSON.parse(message.data) as JobEvent["data"];
    const index = this.jobIds.indexOf(data.job_id);
    if (index < 0) return false;
    const ids = parsePositions(message.id, this.jobIds.length);
    const position = ids ? (ids[index] as number) : (this.positions[index] as number) + 1;
    if (position <= (this.positions[index] as number)) return false; // a repeat: already handled
    this.positions[index] = position;
    const state: JobState = { ...(this.states[index] as JobState), ...data };
    this.states[index] = state;
    if (isFinalStatus(name)) this.finished[index] = true;
    this.options.onUpdate?.(state, { id: message.id ?? this.positions.join("."), name, jobId: data.job_id, position,
      data });
    return true;
  }

  /** Poll every unfinished job until all have ended. */
  private async poll(): Promise<void> {
    for (;;) {
      await this.pollRound();
      if (this.done()) return;
      await sleep(this.options.pollIntervalMs ?? 3000, this.signal);
    }
  }

  /** Read every unfinished job once; a transient failure waits for the next round. */
  private async pollRound(): Promise<void> {
    for (const [index, jobId] of this.jobIds.entries()) {
      if (this.finished[index]) continue;
      let job: JobState;
      try {
        job = await this.context.getJob(jobId, this.signal);
      } catch (error) {
        this.throwIfAborted();
        if (error instanceof MvApiError && error.transient) continue;
        throw error;
      }
      const before = this.states[index] as JobState;
      const state: JobState = { ...before, ...job };
      this.states[index] = state;
      if (isFinalStatus(state.status)) this.finished[index] = true;
      if (changed(before, state)) this.options.onUpdate?.(state, undefined);
    }
  }
}

function changed(before: JobState, after: JobState): boolean {
  return before.status !== after.status || before.stage !== after.stage || before.progress !== after.progress
    || before.video_url !== after.video_url || JSON.stringify(before.error) !== JSON.stringify(after.error);
}

/** The per-job positions of an event id (`7`, or `3.7.0` on the multi-job stream); undefined if it is not one. */
export function parsePositions(id: string | undefined, count: number): number[] | undefined {
  if (id === undefined) return undefined;
  const parts = id.split(".");
  if (parts.length !== count || !parts.every((part) => /^\d{1,9}$/.test(part))) return undefined;
  return parts.map(Number);
}

/** The caller's signal, aborted as well after `timeoutMs`. */
function withTimeout(signal: AbortSignal | undefined, timeoutMs: number | undefined): AbortSignal | undefined {
  if (timeoutMs === undefined) return signal;
  const timeout = AbortSignal.timeout(timeoutMs);
  if (signal === undefined) return timeout;
  const controller = new AbortController();
  for (const source of [signal, timeout]) {
    if (source.aborted) controller.abort(source.reason);
    else source.addEventListener("abort", () => controller.abort(source.reason), { once: true });
  }
  return controller.signal;
}
