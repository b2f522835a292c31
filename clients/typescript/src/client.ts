import createClient, { type Client } from "openapi-fetch";

import { MvApiError } from "./errors.js";
import { JobFollower, type FollowContext, type FollowOptions } from "./follow.js";
import type { components, paths } from "./generated/openapi.js";
import { withRetries, type RetryMode, type RetryPolicy } from "./retry.js";
import type { EventsLink, JobAccepted, JobState } from "./types.js";

type Schemas = components["schemas"];

export interface MvClientOptions {
  /** Where the API is: `https://mv.example.com`, `http://127.0.0.1:8080`. Default `""`: the page's own origin (a
   * browser resolves the relative URLs; Node needs an absolute one). */
  baseUrl?: string;
  /** The API key (`mv_<id>_<secret>`), sent as `Authorization: Bearer`; a function is asked before every call (e.g.
   * `() => sessionStorage.getItem("mvKey")`). Leave it out when keys are off. */
  apiKey?: string | null | (() => string | null | undefined);
  /** The fetch to use (default: the global one, looked up at each call). */
  fetch?: typeof fetch;
  /** Retries of every call (see `RetryPolicy`); per call, `retry` overrides it. */
  retry?: RetryPolicy;
}

/** Options of one call. */
export interface CallOptions {
  signal?: AbortSignal;
  retry?: RetryPolicy;
}

/** Options of a call that starts a job. */
export interface StartOptions extends CallOptions {
  /** Sent as `Idempotency-Key`; default a new random one per call, reused by its retries. Keep one per user action
   * and pass it again when repeating that action (after a reload, say): the server answers with the first job. */
  idempotencyKey?: string;
}

/** A job-creating POST's answer. */
export interface Started<T> {
  data: T;
  /** True when the server answered a repeat with the first answer (`Idempotent-Replayed: true`): no new job. */
  replayed: boolean;
  idempotencyKey: string;
}

export interface StartedJob {
  job: JobAccepted;
  replayed: boolean;
  idempotencyKey: string;
}

/** The POSTs that start jobs and take `Idempotency-Key`. */
export type JobCreatingPath = "/api/mv/generate_video" | "/api/mv/lipsync" | "/api/mv/assemble"
  | "/api/mv/projects/{project_id}/clips" | "/api/mv/projects/{project_id}/scenes/{scene_id}/clips"
  | "/api/mv/projects/{project_id}/assemble" | "/api/mv/projects/{project_id}/scenes/{scene_id}/lipsync";

type PostOperation<P extends JobCreatingPath> = paths[P]["post"];
type PathParams<P extends JobCreatingPath> = PostOperation<P>["parameters"] extends { path: infer A } ? A : never;
type RequestBodyOf<P extends JobCreatingPath> = PostOperation<P> extends {
  requestBody?: { content: { "application/json": infer B } } } ? B : never;

/** A job-creating POST: its path parameters (if it has any) and body. */
export type StartJobInit<P extends JobCreatingPath> = ([PathParams<P>] extends [never] ? { path?: never }
  : { path: PathParams<P> }) & { body?: RequestBodyOf<P> };

export type JobListQuery = NonNullable<paths["/api/mv/jobs"]["get"]["parameters"]["query"]>;

type Answer = { data?: unknown; error?: unknown; response: Response };
type LooseClient = { request(method: string, path: string, init: Record<string, unknown>): Promise<Answer> };

/**
 * The mvserver API: `api` is the typed openapi-fetch client of every path; the methods add what every
 * integration needs (typed errors, retries with `Idempotency-Key` and `Retry-After`, following jobs over SSE with
 * resume and a polling fallback).
 */
export class MvClient {
  /** openapi-fetch client typed from the server's OpenAPI document (answers `{data, error, response}`). */
  readonly api: Client<paths>;
  private readonly baseUrl: string;
  private readonly apiKey: MvClientOptions["apiKey"];
  private readonly fetcher: typeof fetch;
  private readonly retry: RetryPolicy;

  constructor(options: MvClientOptions = {}) {
    this.baseUrl = (options.baseUrl ?? "").replace(/\/+$/, "");
    this.apiKey = options.apiKey;
    this.retry = options.retry ?? {};
    const custom = options.fetch;
    this.fetcher = (input, init) => (custom ?? globalThis.fetch)(input, init);
    this.api = createClient<paths>({ baseUrl: this.baseUrl, fetch: this.fetcher });
    this.api.use({
      onRequest: ({ request }) => {
        for (const [name, value] of Object.entries(this.authHeaders())) {
          if (!request.headers.has(name)) request.headers.set(name, value);
        }
        return request;
      },
    });
  }

  /** An absolute URL for a path the server answered (`/api/mv/get_video/...`); absolute URLs are kept. */
  url(path: string): string {
    return /^https?:\/\//.test(path) ? path : this.baseUrl + path;
  }

  /** `Authorization: Bearer <key>` when a key is set. */
  authHeaders(): Record<string, string> {
    const key = typeof this.apiKey === "function" ? this.apiKey() : this.apiKey;
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  /**
   * The URL a browser should load for `name` (`video_url`, `image_url`, `events_url`, ...) of an answer: its signed
   * link when the answer has one (keys on: `<video>` and `<img>` cannot send the key), else the plain URL.
   */
  linkFor<T extends { signed_urls?: object | undefined }>(answer: T, name: keyof T & string): string | undefined {
    const signed = (answer.signed_urls as Record<string, unknown> | undefined)?.[name];
    const plain = answer[name];
    const path = typeof signed === "string" ? signed : typeof plain === "string" ? plain : undefined;
    return path === undefined ? undefined : this.url(path);
  }

  /** Data of an openapi-fetch answer, or its error as `MvApiError`; repeated per `mode` and the retry policy. */
  async call<T>(send: () => Promise<{ data?: T; error?: unknown; response: Response }>, mode: RetryMode,
    options: CallOptions = {}): Promise<{ data: T; response: Response }> {
    return withRetries(async () => {
      let answer: { data?: T; error?: unknown; response: Response };
      try {
        answer = await send();
      } catch (error) {
        if (options.signal?.aborted) throw options.signal.reason;
        throw error instanceof MvApiError ? error : MvApiError.network(error);
      }
      if (!answer.response.ok) throw MvApiError.fromAnswer(answer.response, answer.error);
      return { data: answer.data as T, response: answer.response };
    }, mode, { ...this.retry, ...options.retry }, options.signal);
  }

  async health(options: CallOptions = {}) {
    return (await this.call(() => this.api.GET("/api/mv/health", { signal: options.signal }), "idempotent",
      options)).data;
  }

  /** Scene prompts from an idea (Gemini; tens of seconds live). Repeated only when refused (429/503). */
  async createScenes(body: Schemas["CreateScenesRequest"], options: CallOptions = {}) {
    const { data } = await this.call(() => this.api.POST("/api/mv/create_scenes", { body, signal: options.signal }),
      "refused", options);
    return described<SceneList>(data);
  }

  /** A character reference image (Imagen 4). Repeated only when refused (429/503). */
  async generateCharacterReference(body: Schemas["CharacterReferenceRequest"], options: CallOptions = {}) {
    const { data } = await this.call(() => this.api.POST("/api/mv/generate_character_reference",
      { body, signal: options.signal }), "refused", options);
    return described<CharacterImage>(data);
  }

  /** Start a video job (202 at once); follow it with `followJob` or `waitForJob`. */
  async generateVideo(body: Schemas["GenerateVideoRequest"], options: StartOptions = {}): Promise<StartedJob> {
    return this.startedJob(await this.startJob("/api/mv/generate_video", { body }, options));
  }

  /** Start a lip-sync job: a finished clip's mouth movements follow a window of a song. */
  async lipsync(body: Schemas["LipsyncRequest"], options: StartOptions = {}): Promise<StartedJob> {
    return this.startedJob(await this.startJob("/api/mv/lipsync", { body }, options));
  }

  /** Start an assembly job of finished clips (cuts or crossfades, optional song). */
  async assemble(body: Schemas["AssembleRequest"], options: StartOptions = {}): Promise<StartedJob> {
    return this.startedJob(await this.startJob("/api/mv/assemble", { body }, options));
  }

  /**
   * Any POST that starts jobs, with an `Idempotency-Key` (made here unless given) that every retry reuses: a lost
   * answer, a 429 (after its `Retry-After`), a 502/503/504 or a 409 idempotency_in_progress is repeated, and the
   * server answers a repeat with the first answer instead of a second paid job.
   */
  async startJob<P extends JobCreatingPath>(path: P, init: StartJobInit<P>, options: StartOptions = {}
  ): Promise<Started<unknown>> {
    const idempotencyKey = options.idempotencyKey ?? newIdempotencyKey();
    const loose = this.api as unknown as LooseClient;
    const { data, response } = await this.call(() => loose.request("post", path, {
      params: { path: init.path, header: { "Idempotency-Key": idempotencyKey } },
      body: init.body ?? {},
      signal: options.signal,
    }), "idempotent", options);
    return { data, replayed: response.headers.get("Idempotent-Replayed") === "true", idempotencyKey };
  }

  /** The job as `GET /api/mv/jobs/{id}` answers it (with `request`, and `signed_urls` when keys are on). */
  async getJob(jobId: string, options: CallOptions = {}): Promise<JobState> {
    const { data } = await this.call(() => this.api.GET("/api/mv/jobs/{job_id}",
      { params: { path: { job_id: jobId } }, signal: options.signal }), "idempotent", options);
    return described<JobState>(data);
  }

  /** The caller's jobs, newest first (`next_cursor` fetches the next page). */
  async listJobs(query: JobListQuery = {}, options: CallOptions = {}) {
    const { data } = await this.call(() => this.api.GET("/api/mv/jobs", { params: { query }, signal: options.signal }),
      "idempotent", options);
    return described<{ jobs: JobState[]; next_cursor: string | null }>(data);
  }

  /** Cancel a job: answers the job once it has stopped (a job that had already ended is answered unchanged: check
   * `status`). */
  async cancelJob(jobId: string, options: CallOptions = {}): Promise<JobState> {
    const { data } = await this.call(() => this.api.DELETE("/api/mv/jobs/{job_id}",
      { params: { path: { job_id: jobId } }, signal: options.signal }), "idempotent", options);
    return described<JobState>(data);
  }

  /** The multi-job stream's URL for these jobs (signed for the key when keys are on): for an EventSource, a worker,
   * or whatever should follow the jobs without the key. */
  async eventsLink(jobIds: string[], options: CallOptions & { after?: string } = {}): Promise<EventsLink> {
    const query = { jobs: jobIds.join(","), ...(options.after === undefined ? {} : { after: options.after }) };
    const { data } = await this.call(() => this.api.GET("/api/mv/events/link",
      { params: { query }, signal: options.signal }), "idempotent", options);
    return data;
  }

  /**
   * Follow one job to its end over its event stream: `onUpdate` gets every state, each event once and in order;
   * a dropped connection is resumed with `Last-Event-ID`, and polling takes over if the stream cannot be had.
   * Resolves with the final state (`succeeded`, `failed` with `error`, or `canceled`).
   */
  async followJob(job: string | Partial<JobState> & { job_id: string }, options: FollowOptions = {}
  ): Promise<JobState> {
    const [final] = await this.followJobs([job], options);
    return final as JobState;
  }

  /** Follow several jobs on one connection (`/api/mv/events?jobs=...`, up to 50); the final states in order. */
  async followJobs(jobs: (string | Partial<JobState> & { job_id: string })[], options: FollowOptions = {}
  ): Promise<JobState[]> {
    const ids = jobs.map((job) => (typeof job === "string" ? job : job.job_id));
    const seeds = jobs.map((job) => (typeof job === "string" ? undefined : job));
    return new JobFollower(this.followContext(), ids, options, seeds).run();
  }

  /** Wait for a job's end (following its stream); `timeoutMs` bounds the wait. */
  async waitForJob(job: string | Partial<JobState> & { job_id: string }, options: FollowOptions = {}
  ): Promise<JobState> {
    return this.followJob(job, options);
  }

  private followContext(): FollowContext {
    return {
      fetch: this.fetcher,
      url: (path) => this.url(path),
      authHeaders: () => this.authHeaders(),
      getJob: (jobId, signal) => this.getJob(jobId, { signal, retry: { retries: 0 } }), // the follower polls again
      eventsLink: (jobIds, signal) => this.eventsLink(jobIds, { signal }),
    };
  }

  private startedJob(started: Started<unknown>): StartedJob {
    const { replayed, idempotencyKey } = started;
    return { job: described<JobAccepted>(started.data), replayed, idempotencyKey };
  }
}

export function createMvClient(options: MvClientOptions = {}): MvClient {
  return new MvClient(options);
}

/** An answer the OpenAPI document does not describe yet (src/types.ts writes it from the client notes). Taking it
 * as unknown keeps this compiling whatever response schemas the document gains before the types here follow. */
function described<T>(data: unknown): T {
  return data as T;
}

/** A random UUID4 (crypto.randomUUID needs a secure context; getRandomValues does not). */
export function newIdempotencyKey(): string {
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = ((bytes[6] as number) & 0x0f) | 0x40;
  bytes[8] = ((bytes[8] as number) & 0x3f) | 0x80;
  const hex = Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** `create_scenes`' answer (client notes §2). */
export interface SceneList {
  scenes_id: string;
  scenes: { description: string; negative_description: string }[];
  sandbox: boolean;
  urls: { json: string; markdown: string };
  signed_urls?: Record<string, string>;
  metadata: Record<string, unknown>;
}

/** `generate_character_reference`'s answer (client notes §2). */
export interface CharacterImage {
  image_id: string;
  image_base64: string;
  mime_type: string;
  image_url: string;
  sandbox: boolean;
  images: { image_id: string; mime_type: string; image_url: string; seed: number | null }[];
  signed_urls?: Record<string, string>;
  metadata: Record<string, unknown>;
}
