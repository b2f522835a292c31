"""Settings: YAML files under ``settings/`` and environment variables, loaded and validated once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import jinja2
import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_SETTINGS_DIR = PROJECT_DIR / "settings"
DEFAULT_OUTPUT_DIR = PROJECT_DIR / "outputs"


class ConfigError(Exception):
    """A settings file or environment variable is missing or invalid; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    min: int
    max: int

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


class ScenesDefaults(_Strict):
    character_characteristics: str
    number_of_scenes: int
    video_type: str
    video_characteristics: str
    camera_angle: str


class ScenesLimits(_Strict):
    number_of_scenes: Range
    text_max_chars: PositiveInt


class ScenesSettings(_Strict):
    model: str
    temperature: float = Field(ge=0, le=2)
    malformed_reply_retries: int = Field(ge=0, le=5)
    timeout_seconds: PositiveFloat
    defaults: ScenesDefaults
    limits: ScenesLimits
    prompt: str

    @model_validator(mode="after")
    def _default_in_range(self) -> "ScenesSettings":
        bounds = self.limits.number_of_scenes
        if not bounds.min <= self.defaults.number_of_scenes <= bounds.max:
            raise ValueError("defaults.number_of_scenes lies outside limits.number_of_scenes")
        return self


class ImagesDefaults(_Strict):
    aspect_ratio: str
    safety_filter_level: str
    person_generation: str
    output_format: str
    negative_prompt: str
    seed: int | None


class ImagesAllowed(_Strict):
    aspect_ratio: list[str] = Field(min_length=1)
    safety_filter_level: list[str] = Field(min_length=1)
    person_generation: list[str] = Field(min_length=1)
    output_format: list[Literal["png", "jpg", "webp"]] = Field(min_length=1)


class TextLimits(_Strict):
    text_max_chars: PositiveInt


class ImagesSettings(_Strict):
    model: str
    timeout_seconds: PositiveFloat
    poll_interval_seconds: PositiveFloat
    defaults: ImagesDefaults
    allowed: ImagesAllowed
    limits: TextLimits
    prompt: str

    @model_validator(mode="after")
    def _defaults_allowed(self) -> "ImagesSettings":
        _check_defaults_allowed(self.defaults, self.allowed)
        return self


class ReplicateVideoBackend(_Strict):
    model: str
    reference_image_aspect_ratios: list[str] = Field(min_length=1)
    reference_image_durations: list[PositiveInt] = Field(min_length=1)


class GeminiVideoBackend(_Strict):
    model: str
    person_generation: str
    resolution: str


class VideoBackends(_Strict):
    replicate: ReplicateVideoBackend
    gemini: GeminiVideoBackend


class VideosDefaults(_Strict):
    negative_prompt: str
    aspect_ratio: str
    duration: int
    generate_audio: bool
    seed: int | None


class VideosAllowed(_Strict):
    aspect_ratio: list[str] = Field(min_length=1)
    duration: list[PositiveInt] = Field(min_length=1)


class VideosLimits(_Strict):
    text_max_chars: PositiveInt
    reference_image_max_bytes: PositiveInt


class JobsSettings(_Strict):
    max_concurrent: PositiveInt
    timeout_seconds: PositiveFloat
    poll_interval_seconds: PositiveFloat
    request_timeout_seconds: PositiveFloat
    retry_attempts: int = Field(ge=0, le=20)
    retry_initial_delay_seconds: PositiveFloat
    retry_max_delay_seconds: PositiveFloat
    sse_ping_interval_seconds: PositiveFloat
    sse_retry_ms: int = Field(ge=0)
    sse_max_jobs_per_stream: int = Field(default=50, ge=1, le=500)
    webhook_safety_poll_seconds: PositiveFloat = 30.0
    # Several processes (Redis store): a running job's lease lives this long without renewal (renewed every third
    # of it); a node looks for jobs abandoned by a dead node this often.
    lease_seconds: PositiveFloat = 30.0
    claim_interval_seconds: PositiveFloat = 5.0
    # Finished jobs (record, events, reference image, video) and old images and scenes are removed after this many
    # hours; 0 keeps everything. An expired job id answers 410 for as long again.
    retention_hours: float = Field(default=720.0, ge=0)


class VideosSettings(_Strict):
    default_backend: Literal["replicate", "gemini"]
    backends: VideoBackends
    defaults: VideosDefaults
    allowed: VideosAllowed
    limits: VideosLimits
    jobs: JobsSettings
    video_rules_template: str

    @model_validator(mode="after")
    def _defaults_allowed(self) -> "VideosSettings":
        _check_defaults_allowed(self.defaults, self.allowed)
        return self


class SandboxSettings(_Strict):
    video_latency_seconds: float = Field(ge=0)
    image_latency_seconds: float = Field(ge=0)
    scenes_latency_seconds: float = Field(ge=0)


def _check_defaults_allowed(defaults: BaseModel, allowed: BaseModel) -> None:
    for name, choices in allowed:
        value = getattr(defaults, name)
        if value not in choices:
            raise ValueError(f"defaults.{name} = {value!r} is not one of allowed.{name} {choices}")


SETTINGS_FILES: dict[str, type[_Strict]] = {
    "scenes": ScenesSettings,
    "images": ImagesSettings,
    "videos": VideosSettings,
    "sandbox": SandboxSettings,
}

# Settings keys that hold Jinja2 templates, compiled at start-up.
TEMPLATE_KEYS = {("scenes", "prompt"), ("images", "prompt"), ("videos", "video_rules_template")}


def _env_bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"environment: {name}={raw!r} is not a boolean (use true or false)")


def _env_number(env: Mapping[str, str], name: str, default: float | None, kind: type = int) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"environment: {name}={raw!r} is not a {kind.__name__}") from None
    if value < 0:
        raise ConfigError(f"environment: {name} must not be negative")
    return value


def _public_base_url(raw: str | None) -> str | None:
    """``MV_PUBLIC_BASE_URL``: an absolute http(s) URL, kept without its trailing slash."""
    if raw is None:
        return None
    if not raw.startswith(("https://", "http://")) or " " in raw or "?" in raw or "#" in raw:
        raise ConfigError(f"environment: MV_PUBLIC_BASE_URL={raw!r} is not an http(s) base URL")
    return raw.rstrip("/")


@dataclass(frozen=True)
class EnvSettings:
    """Secrets and knobs from the environment (``.env`` is loaded into it by ``python -m mvserver``)."""

    gemini_api_key: str | None = None
    replicate_api_token: str | None = None
    vertex_api_key: str | None = None
    google_cloud_project: str | None = None
    google_cloud_location: str = "us-central1"
    debug: bool = False
    sandbox: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    output_dir: Path = DEFAULT_OUTPUT_DIR
    settings_dir: Path = DEFAULT_SETTINGS_DIR
    max_body_bytes: int = 16 * 1024 * 1024
    max_concurrent_jobs: int | None = None
    sandbox_video_latency: float | None = None
    gemini_base_url: str | None = None
    vertex_base_url: str | None = None
    replicate_base_url: str | None = None
    public_base_url: str | None = None
    replicate_webhook_signing_key: str | None = None
    sandbox_webhooks: bool = True
    redis_url: str | None = None
    redis_prefix: str = "mv:"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "EnvSettings":
        """Read every ``MV_*`` knob and provider secret; blank values count as unset."""
        env = os.environ if env is None else env

        def text(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        return cls(
            gemini_api_key=text("GEMINI_API_KEY"),
            replicate_api_token=text("REPLICATE_API_TOKEN"),
            vertex_api_key=text("GOOGLE_VERTEX_API_KEY"),
            google_cloud_project=text("GOOGLE_CLOUD_PROJECT"),
            google_cloud_location=text("GOOGLE_CLOUD_LOCATION") or "us-central1",
            debug=_env_bool(env, "MV_DEBUG_MODE"),
            sandbox=_env_bool(env, "MV_SANDBOX"),
            host=text("MV_HOST") or "127.0.0.1",
            port=_env_number(env, "MV_PORT", 8080),
            output_dir=Path(text("MV_OUTPUT_DIR") or DEFAULT_OUTPUT_DIR),
            settings_dir=Path(text("MV_SETTINGS_DIR") or DEFAULT_SETTINGS_DIR),
            max_body_bytes=int(_env_number(env, "MV_MAX_BODY_MB", 16.0, float) * 1024 * 1024),
            max_concurrent_jobs=_env_number(env, "MV_MAX_CONCURRENT_JOBS", None) or None,
            sandbox_video_latency=_env_number(env, "MV_SANDBOX_VIDEO_SECONDS", None, float),
            gemini_base_url=text("MV_GEMINI_BASE_URL"),
            vertex_base_url=text("MV_VERTEX_BASE_URL"),
            replicate_base_url=text("MV_REPLICATE_BASE_URL"),
            public_base_url=_public_base_url(text("MV_PUBLIC_BASE_URL")),
            replicate_webhook_signing_key=text("MV_REPLICATE_WEBHOOK_SECRET"),
            sandbox_webhooks=_env_bool(env, "MV_SANDBOX_WEBHOOKS", True),
            redis_url=text("MV_REDIS_URL"),
            redis_prefix=text("MV_REDIS_PREFIX") or "mv:",
        )

    @property
    def gemini_video_configured(self) -> bool:
        """Veo needs Vertex: an express-mode API key, or a project with application-default credentials."""
        return bool(self.vertex_api_key or self.google_cloud_project)


@dataclass(frozen=True)
class Config:
    """Everything the service reads at start-up."""

    env: EnvSettings
    scenes: ScenesSettings
    images: ImagesSettings
    videos: VideosSettings
    sandbox: SandboxSettings
    templates: dict[str, jinja2.Template] = field(repr=False)

    @property
    def debug(self) -> bool:
        return self.env.debug

    @property
    def max_concurrent_jobs(self) -> int:
        return self.env.max_concurrent_jobs or self.videos.jobs.max_concurrent

    @property
    def sandbox_video_latency(self) -> float:
        latency = self.env.sandbox_video_latency
        return self.sandbox.video_latency_seconds if latency is None else latency

    def render(self, key: str, **variables: Any) -> str:
        """Render the template stored at settings key ``key`` (e.g. ``"scenes.prompt"``)."""
        try:
            return self.templates[key].render(**variables).strip()
        except jinja2.UndefinedError as exc:  # a template names a variable the code does not pass
            raise ConfigError(f"template {key}: {exc.message}") from exc

    def summary(self) -> dict[str, Any]:
        """The loaded parameters, for the start-up debug print (secrets shown only as set/unset)."""
        secrets = {"gemini_api_key", "replicate_api_token", "vertex_api_key", "replicate_webhook_signing_key",
                   "redis_url"}
        env = {k: ("set" if v else "unset") if k in secrets else str(v) for k, v in vars(self.env).items()}
        return {
            "env": env,
            "scenes": self.scenes.model_dump(),
            "images": self.images.model_dump(),
            "videos": self.videos.model_dump(),
            "sandbox": self.sandbox.model_dump(),
        }


CONFIG = web.AppKey("config", Config)
TEMPLATES = web.AppKey("templates", jinja2.Environment)


def package_templates() -> jinja2.Environment:
    """The templates shipped in ``mvserver/templates`` (Markdown export, demo page)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("mvserver", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(["html"]),
    )


def _template_environment() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: settings file is missing") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        parts.append(f"{key}: {message}")
    return "; ".join(parts)


def load_config(env: EnvSettings | None = None) -> Config:
    """Load and validate every settings file and compile its templates; raise ConfigError naming file and key."""
    env = env or EnvSettings.from_env()
    loaded: dict[str, Any] = {}
    for name, model in SETTINGS_FILES.items():
        path = env.settings_dir / f"{name}.yaml"
        try:
            loaded[name] = model.model_validate(_read_yaml(path))
        except ValidationError as exc:
            raise ConfigError(f"{path}: {_describe(exc)}") from None
    templates: dict[str, jinja2.Template] = {}
    jinja = _template_environment()
    for name, key in sorted(TEMPLATE_KEYS):
        source = getattr(loaded[name], key)
        try:
            templates[f"{name}.{key}"] = jinja.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            path = env.settings_dir / f"{name}.yaml"
            raise ConfigError(f"{path}: {key}: template does not compile: {exc.message} (line {exc.lineno})") from None
    return Config(env=env, templates=templates, **loaded)
