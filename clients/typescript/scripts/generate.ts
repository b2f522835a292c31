/** `npm run generate`: regenerate src/generated/openapi.ts from the current server's OpenAPI document. */
import { writeFile } from "node:fs/promises";

import { GENERATED_FILE, generateCurrentTypes } from "./openapi.ts";

const source = await generateCurrentTypes();
await writeFile(GENERATED_FILE, source);
console.log(`wrote ${GENERATED_FILE} (${source.length} characters)`);
