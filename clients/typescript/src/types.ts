/**
 * Shapes of the job answers and events. The OpenAPI document describes requests and errors but not (yet) these
 * bodies, so they are written here from the client notes (.devdocs/v1/client-impl-notes.md §2-§3).
 */
import type { ErrorBody } from "./errors.js";

export type JobStatus = "queued" | "running" | "succeeded" | "failed" | "canceled";
export type FinalStatus = "succeeded" | "failed" | "canceled";
/** Named SSE events: one per status, plus `progress`. */
export type JobEventName = JobStatus | "progress";

export const FINAL_STATUSES: readonly FinalStatus[] = ["succeeded", "failed", "canceled"];
export const JOB_EVENT_NAMES: readonly JobEventName[] = ["queued", "running", "progress", ...FINAL_STATUSES];

export function isFinalStatus(status: string | undefined): status is FinalStatus {
  return (FINAL_STATUSES as readonly string[]).includes(status ?? "");
}

/** `signed_urls` of an answer made with an API key: the same paths with `kid`, `exp` and `sig`, for what a browser
 * loads without headers (`<video>`, `<img>`, an EventSource). */
export interface SignedUrls {
  status_url?: string;
  events_url?: string;
  video_url?: string;
  image_url?: string;
  expires_at: string;
}

/** A job as `GET /api/mv/jobs/{id}` answers it; events carry the same fields (a `progress` event only some). */
export interface JobState {
  job_id: string;
  kind?: "video" | "lipsync" | "assembly" | (string & {});
  status: JobStatus;
  /** `queued`, `submitting`, `generating`, `downloading`, `running`, `done`, ... (for progress text). */
  stage?: string;
  /** null: unknown (an indeterminate bar); else 0..1. */
  progress?: number | null;
  backend?: string;
  model?: string;
  sandbox?: boolean;
  provider_prediction_id?: string | null;
  created_at?: number;
  started_at?: number | null;
  finished_at?: number | null;
  elapsed_seconds?: number;
  error?: ErrorBody | null;
  /** Set once the job succeeded. */
  video_url?: string | null;
  video_bytes?: number | null;
  status_url?: string;
  events_url?: string;
  /** What the job used and its estimated cost: null until it ends (then also on its final event). */
  usage?: JobUsage | null;
  /** `progress` events: seconds left, estimated from recent runs of the model and kind of request (0: late). */
  eta_seconds?: number;
  /** `progress` events: true when `progress` is guessed from recent run times (the provider reports none). */
  progress_estimated?: boolean;
  /** The provider's last log lines (on `progress` events when they changed), for a job created with `provider_logs: true`. */
  logs?: string;
  /** Server time (Unix seconds) an event was published. */
  event_time?: number;
  request?: Record<string, unknown>;
  project_id?: string;
  scene_id?: string;
  signed_urls?: SignedUrls;
}

/** A job's estimated cost (`usage.cost`); add `amount_micros` (integer millionths), not `amount`. */
export interface JobCost {
  amount: number;
  amount_micros: number;
  currency: string;
  as_of: string | null;
  /** `price_table`; `sandbox` and `local` (ffmpeg) cost 0; `unpriced`. */
  basis: "price_table" | "sandbox" | "local" | "unpriced" | (string & {});
  estimated: boolean;
}

/** What an ended job used (`usage`). */
export interface JobUsage {
  provider: string;
  model: string;
  output_seconds: number | null;
  images: number;
  /** The provider's own numbers, unchanged (Replicate: `predict_time`, `total_time`). */
  provider_metrics: Record<string, number> | null;
  queue_seconds: number;
  wall_seconds: number;
  retries: number;
  cost: JobCost;
}

/** The 202 answer of a job-creating POST (`generate_video`, `lipsync`, `assemble`). */
export interface JobAccepted {
  job_id: string;
  kind?: string;
  status: JobStatus;
  backend?: string;
  sandbox?: boolean;
  status_url: string;
  events_url: string;
  video_url: string;
  signed_urls?: SignedUrls;
}

/** One SSE event of a job, delivered once and in order. */
export interface JobEvent {
  /** The SSE id as sent: the job's position (`7`) on a job's stream, every job's (`3.7.0`) on the multi-job stream.
   * Pass the last one as `lastEventId` to resume later. */
  id: string;
  name: JobEventName;
  jobId: string;
  /** This job's event number (1, 2, 3, ... with no gaps). */
  position: number;
  /** The event's data: the full state on status events, only what moved on most `progress` events. */
  data: Partial<JobState> & { job_id: string };
}

/** `GET /api/mv/events/link`: the multi-job stream's URL (signed when keys are on). */
export interface EventsLink {
  events_url: string;
  expires_at: string | null;
  jobs: string[];
}
