import { createMvClient, MvApiError } from "@mvserver/client";

const mv = createMvClient({ baseUrl: process.env.MV_URL ?? "http://127.0.0.1:8080", apiKey: process.env.MV_API_KEY });
try {
  const { job } = await mv.generateVideo({ prompt: "She runs for the last train on a rainy platform." });
  const final = await mv.followJob(job, { onUpdate: (j) => console.log(j.status, j.stage, j.progress ?? "") });
  if (final.status === "succeeded") console.log("video:", mv.linkFor(final, "video_url"));
  else console.error(final.status, final.error?.code, final.error?.message);
} catch (error) {
  if (error instanceof MvApiError) console.error(error.status, error.code, error.field ?? "", error.message);
  else throw error;
}
