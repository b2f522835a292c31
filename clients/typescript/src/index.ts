export { createMvClient, MvClient, newIdempotencyKey, type CallOptions, type CharacterImage, type JobCreatingPath,
  type JobListQuery, type MvClientOptions, type SceneList, type StartJobInit, type Started, type StartedJob,
  type StartOptions } from "./client.js";
export { MvApiError, parseRetryAfter, type ErrorBody } from "./errors.js";
export { JobFollower, parsePositions, type FollowContext, type FollowOptions, type ReconnectInfo } from "./follow.js";
export { DEFAULT_RETRY, sleep, withRetries, type RetryMode, type RetryPolicy } from "./retry.js";
export { readEventStream, type EventSourceMessage } from "./sse.js";
export { FINAL_STATUSES, isFinalStatus, JOB_EVENT_NAMES, type EventsLink, type FinalStatus, type JobAccepted,
  type JobCost, type JobEvent, type JobEventName, type JobState, type JobStatus, type JobUsage, type SignedUrls }
  from "./types.js";
export type { components, operations, paths } from "./generated/openapi.js";
