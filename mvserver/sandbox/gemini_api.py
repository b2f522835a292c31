"""Simulated Google endpoints: Gemini ``generateContent`` (Developer API) and Veo long-running operations (Vertex)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from typing import Any

from aiohttp import web

from .simulator import SIMULATOR


def google_error(status: int, code: str, message: str) -> web.Response:
    """An error in Google's shape: ``{"error": {"code", "message", "status"}}``."""
    return web.json_response({"error": {"code": status, "message": message, "status": code}}, status=status)


def _prompt_text(body: dict[str, Any]) -> str:
    parts = [part.get("text", "") for content in body.get("contents", []) for part in content.get("parts", [])]
    return "\n".join(parts)


def _after(label: str, text: str) -> str | None:
    match = re.search(rf"{label}\s*(.+)", text)
    return match.group(1).strip() if match else None


SHOTS = ["Wide establishing shot", "Medium shot", "Close-up", "Over-the-shoulder shot", "Low-angle shot", "Tracking shot"]
BEATS = [
    ("arrives and takes in the scene", 'sighs dramatically: "Of course it had to be today."'),
    ("tries something bold and it goes sideways", 'laughs nervously: "That was totally on purpose."'),
    ("pauses as the mood turns tender", 'whispers: "Okay. Maybe this matters."'),
    ("finds the moment and owns it", 'shouts with joy: "Now we are talking!"'),
]


def simulated_scenes(prompt: str) -> dict[str, Any]:
    """Plausible scenes built from the words of the prompt (count, idea, character, style, angle)."""
    count = int(_after(r"exactly", prompt).split()[0]) if _after(r"exactly", prompt) else 4
    idea = _after(r"about:", prompt) or "a day in the life"
    character = _after(r"\(visual description\):", prompt) or "the main character"
    style = _after(r"Style:", prompt) or "cinematic"
    angle = _after(r"Primary camera angle:", prompt) or "front"
    scenes = []
    for index in range(count):
        action, line = BEATS[index % len(BEATS)]
        shot = SHOTS[index % len(SHOTS)]
        scenes.append({
            "description": f"[sandbox] Scene {index + 1} of {count}, {idea}. {shot} from the {angle}: {character} "
                           f"{action}. Style: {style}. The character {line}",
            "negative_description": "blurry, distorted faces, extra limbs, extra people, text, subtitles, watermark",
        })
    return {"scenes": scenes}


async def generate_content(request: web.Request) -> web.StreamResponse:
    """``POST /gemini/{version}/models/{model}:generateContent``: JSON scenes when JSON output is asked for."""
    sim = request.app[SIMULATOR]
    model, _, method = request.match_info["model_method"].partition(":")
    if method != "generateContent":
        return google_error(404, "NOT_FOUND", f"method {method!r} is not supported by the simulator")
    if not request.headers.get("x-goog-api-key"):
        return google_error(401, "UNAUTHENTICATED", "API key not valid. Please pass a valid API key.")
    body = await request.json()
    prompt = _prompt_text(body)
    await asyncio.sleep(sim.scenes_latency)
    wants_json = body.get("generationConfig", {}).get("responseMimeType") == "application/json"
    text = json.dumps(simulated_scenes(prompt)) if wants_json else f"[sandbox] {prompt[:200]}"
    fault = sim.take_fault("gemini.generate", ("fail_prediction",))
    if fault is not None:  # a reply that parses as text but not as the asked-for JSON
        text = fault.error if isinstance(fault.error, str) else '{"scenes": "not a list"'
    tokens = len(prompt.split())
    return web.json_response({
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": tokens, "candidatesTokenCount": len(text.split()),
                          "totalTokenCount": tokens + len(text.split())},
        "modelVersion": model,
        "responseId": hashlib.sha1(prompt.encode()).hexdigest()[:16],
    })


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/gemini/{version}/models/{model_method}", generate_content, name="gemini.generate")
