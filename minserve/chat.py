"""Chat messages and templates: the one check of OpenAI-style messages (the server and LLM.chat
both go through normalize_messages, which follows vLLM's parsing) and rendering a model's jinja2
chat template the way transformers does, in an immutable sandbox. Never tokenizes or imports
torch."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minserve.errors import library_text
from minserve.value_text import value_text

# Text part type -> the field holding its text (vLLM's set: Responses-style input_text and
# output_text, and its "thinking" parts, are text too).
TEXT_PART_TYPES = {"text": "text", "input_text": "text", "output_text": "text",
                   "refusal": "refusal", "thinking": "thinking"}
# Part type -> the modality named in the error a text-only model gives back.
MEDIA_PART_TYPES = {
    "image_url": "images", "input_image": "images", "image": "images", "image_embeds": "images",
    "image_pil": "images", "input_audio": "audio", "audio_url": "audio", "audio": "audio",
    "audio_embeds": "audio", "video_url": "video", "video": "video", "file": "files",
    "input_file": "files",
}
# Variables the renderer sets itself; chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARS = frozenset(
    {"messages", "add_generation_prompt", "tools", "documents", "chat_template", "tokenize"}
)
# Appended to the final message when continuing it, then cut off (transformers does the same).
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
MISSING_TEMPLATE_MESSAGE = (
    "this model has no chat template, so chat requests cannot be formatted; start minserve with "
    "--chat-template (a file path or the jinja2 template text), or use /v1/completions"
)

ContentFormat = Literal["string", "openai"]
# Image part types a vision model takes: OpenAI's image_url (and Responses' input_image), and
# LLM.chat's image_pil holding a Pillow image.
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image_pil"})


@dataclass(slots=True)
class ImageRef:
    """One image part of a conversation, in order: a URL (http(s), data:, file:) or, from
    LLM.chat, a Pillow image. `param` names the part, for error messages."""
    url: str | None
    image: Any
    param: str


@dataclass(slots=True)
class ImageParts:
    """How a vision model's image parts render: `placeholder` is what a string-content template
    gets for each image (openai-content templates get {"type": "image"} parts); each part found
    is appended to `found`."""
    placeholder: str
    found: list[ImageRef] = field(default_factory=list)

    def text(self, number: int) -> str:
        """The placeholder of the conversation's image `number` (from 1): "{n}" in it becomes
        the number (Phi-3-vision's <|image_1|>, <|image_2|>, ...)."""
        return self.placeholder.replace("{n}", str(number))


class ChatTemplateError(ValueError):
    """The template is missing, does not compile, or failed (raise_exception, a bad field...)."""


class ChatContentError(ValueError):
    """The messages themselves are malformed or ask for something this model cannot take (an
    image part on a text-only model). `param` names the offending field for the OpenAI error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def load_chat_template(source: str) -> str:
    """--chat-template: a .jinja file, a JSON file holding "chat_template", or the text itself."""
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            text = f.read()
        if source.endswith(".json"):
            data = json.loads(text)
            text = data.get("chat_template", text) if isinstance(data, dict) else text
        return text
    if "{{" in source or "{%" in source or "\n" in source:
        return source  # template text given inline, as vLLM accepts
    raise ChatTemplateError(
        f"--chat-template {source!r} is neither an existing file nor jinja2 template text"
    )


# ---------------------------------------------------------------- the sandboxed environment


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML and has no ensure_ascii; HF templates expect this one.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without handing them the real type object."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, closing a known route to CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's trick: a field may be named self
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF assistant-mask markers): renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # NOTE: the same settings as transformers' _compile_jinja_template, so templates written for HF
    # render byte-for-byte alike: trim_blocks/lstrip_blocks, loop controls, HF's tojson.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {library_text(e)}") from e


@lru_cache(maxsize=32)
def detect_content_format(template: str) -> ContentFormat:
    """"openai" when the template loops over a message's content (it expects a list of parts),
    else "string" (parts are joined into one string), like vLLM's --chat-template-content-format
    auto."""
    try:
        ast = _environment().parse(template)
    except TemplateError:
        return "string"
    content_vars: set[str] = set()
    for node in ast.find_all(jinja2.nodes.Assign):
        if _is_content_access(node.node) and isinstance(node.target, jinja2.nodes.Name):
            content_vars.add(node.target.name)
    for loop in ast.find_all(jinja2.nodes.For):
        it = loop.iter
        if isinstance(it, jinja2.nodes.Filter) and it.node is not None:
            it = it.node  # e.g. `message.content | selectattr(...)`
        if _is_content_access(it) or (
                isinstance(it, jinja2.nodes.Name) and it.name in content_vars):
            return "openai"
    return "string"


def _is_content_access(node: jinja2.nodes.Node) -> bool:
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
    return False


# ---------------------------------------------------------------- messages


def normalize_messages(messages: Any, content_format: ContentFormat = "string",
                       images: ImageParts | None = None) -> list[dict]:
    """OpenAI request messages -> the dicts templates read (a fresh copy; the input is untouched):
    content joined to one string (or a list of {"type": "text"} parts for "openai" templates),
    tool_calls arguments parsed from JSON text to dicts, name / tool_call_id kept. Image parts
    need `images` (a vision model): each becomes {"type": "image"} for "openai" templates, or its
    placeholder, before the text and joined by a newline, for string ones (vLLM's layout)."""
    if not isinstance(messages, list) or not messages:
        raise ChatContentError("messages must be a non-empty list", param="messages")
    out: list[dict] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ChatContentError(f"{where} must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str):  # any other role goes to the template, as in vLLM
            raise ChatContentError(f"{where}.role must be a string, got {value_text(role)}",
                                   param=f"{where}.role")
        parts = _content_parts(message.get("content"), where, images)
        texts = [p for p in parts if isinstance(p, str)]
        if content_format == "openai" and role != "tool":
            content: Any = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"}
                            for p in parts]
        else:
            # vLLM joins text parts with a newline for string templates (and for tool results,
            # which are plain strings for every template), image placeholders first.
            num_images = len(parts) - len(texts)
            content = "\n".join([images.text(len(images.found) - num_images + k + 1)
                                  for k in range(num_images)] + texts)
        msg: dict[str, Any] = {"role": role, "content": content}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise ChatContentError(f"{where}.name must be a string", param=f"{where}.name")
            msg["name"] = name
        if role == "tool" and message.get("tool_call_id") is not None:
            msg["tool_call_id"] = str(message["tool_call_id"])
        if role == "assistant":
            tool_calls = _tool_calls(message.get("tool_calls"), where)
            if tool_calls:
                msg["tool_calls"] = tool_calls
            reasoning = message.get("reasoning", message.get("reasoning_content"))
            if isinstance(reasoning, str):
                msg["reasoning"] = msg["reasoning_content"] = reasoning
        if role == "developer" and message.get("tools") is not None:
            msg["tools"] = message["tools"]
        out.append(msg)
    return out


def _content_parts(content: Any, where: str, images: ImageParts | None) -> list[str | ImageRef]:
    """The message's text parts (str) and image parts (ImageRef), in order."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ChatContentError(f"{where}.content must be a string or a list of content parts",
                               param=f"{where}.content")
    texts: list[str | ImageRef] = []
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ChatContentError(f"{pwhere} must be an object", param=pwhere)
        kind = part.get("type")
        if kind is None:  # vLLM accepts {"image_url": ...} without a type
            kind = next((k for k in MEDIA_PART_TYPES if k in part),
                        "text" if "text" in part else None)
        if kind is not None and not isinstance(kind, str):
            raise ChatContentError(f"{pwhere}.type must be a string", param=f"{pwhere}.type")
        if kind in TEXT_PART_TYPES:
            field = TEXT_PART_TYPES[kind]
            text = part.get(field)
            if not isinstance(text, str):
                raise ChatContentError(f"{pwhere}.{field} must be a string",
                                       param=f"{pwhere}.{field}")
            texts.append(text)
        elif kind in IMAGE_PART_TYPES and images is not None:
            ref = _image_ref(part, kind, pwhere)
            images.found.append(ref)
            texts.append(ref)
        elif kind in MEDIA_PART_TYPES and images is not None:
            raise ChatContentError(
                f"{pwhere} has type {kind!r}; this model takes images as image_url parts "
                "(http(s) or data: URLs) and text", param=pwhere)
        elif kind in MEDIA_PART_TYPES:
            raise ChatContentError(
                f"this model is text-only and does not accept {MEDIA_PART_TYPES[kind]} ({pwhere} "
                f"has type {value_text(kind)}); send text content only", param=pwhere)
        else:
            raise ChatContentError(
                f"{pwhere} has unsupported content part type {value_text(kind)}; supported: "
                f"{', '.join(sorted(TEXT_PART_TYPES))}", param=f"{pwhere}.type")
    return texts


def _image_ref(part: dict, kind: str, where: str) -> ImageRef:
    """{"type": "image_url", "image_url": {"url": ..., "detail": ...}} (detail is accepted and
    ignored, as vLLM does), a bare URL string in its place (Responses' input_image), or
    {"type": "image_pil", "image_pil": <PIL image>}."""
    if kind == "image_pil":
        if part.get("image_pil") is None:
            raise ChatContentError(f"{where}.image_pil must be a PIL image",
                                   param=f"{where}.image_pil")
        return ImageRef(None, part["image_pil"], where)
    value = part.get(kind) if kind in part else part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise ChatContentError(f"{where}.{kind}.url must be a non-empty string (an http(s) or "
                               "data:image/...;base64 URL)", param=f"{where}.{kind}.url")
    return ImageRef(url, None, where)


def _tool_calls(tool_calls: Any, where: str) -> list[dict]:
    if tool_calls is None:
        return []
    if not isinstance(tool_calls, list):
        raise ChatContentError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
    out = []
    for k, call in enumerate(tool_calls):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise ChatContentError(f"{where}.tool_calls[{k}] must have a function object",
                                   param=f"{where}.tool_calls[{k}]")
        function = dict(call["function"])
        args = function.get("arguments")
        # NOTE: templates read arguments as a mapping (HF and vLLM convention); OpenAI sends text.
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = {}
        elif not isinstance(args, (dict, list)):
            args = {}
        function["arguments"] = args
        out.append({**call, "function": function})
    return out


# ---------------------------------------------------------------- rendering


def render_chat_template(
    template: str | None, messages: list, *, add_generation_prompt: bool = True,
    continue_final_message: bool = False, tools: list[dict] | None = None,
    bos_token: str | None = None, eos_token: str | None = None,
    documents: list[dict] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
    images: ImageParts | None = None, **kwargs: Any,
) -> str:
    """Render `messages` with `template` as transformers' apply_chat_template(tokenize=False)
    would. Extra template variables come as **kwargs and/or chat_template_kwargs (a request's
    dict, whose reserved names are refused rather than allowed to replace the renderer's own)."""
    if template is None:
        raise ChatTemplateError(MISSING_TEMPLATE_MESSAGE)
    if add_generation_prompt and continue_final_message:
        raise ChatTemplateError(
            "continue_final_message and add_generation_prompt cannot both be true: set "
            "add_generation_prompt to false to continue the final message")
    extra = dict(kwargs)
    if chat_template_kwargs:
        if not isinstance(chat_template_kwargs, dict):
            raise ChatContentError("chat_template_kwargs must be an object",
                                   param="chat_template_kwargs")
        if bad := RESERVED_TEMPLATE_VARS & chat_template_kwargs.keys():
            raise ChatContentError(f"chat_template_kwargs may not set {', '.join(sorted(bad))}",
                                   param="chat_template_kwargs")
        extra.update(chat_template_kwargs)
    compiled = compile_template(template)
    conversation = normalize_messages(messages, detect_content_format(template), images)
    if continue_final_message:
        final_text = _tag_final_message(conversation[-1])
    context = {"bos_token": bos_token or "", "eos_token": eos_token or "", **extra}
    try:
        rendered = compiled.render(messages=conversation, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **context)
    except TemplateError as e:  # raise_exception, undefined fields, sandbox refusals
        raise ChatTemplateError(f"chat template error: {library_text(e)}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as e:
        raise ChatTemplateError(
            f"chat template failed: {type(e).__name__}: {library_text(e)}") from e
    if continue_final_message:
        rendered = _cut_after_final_message(rendered, final_text)
    return rendered


def _tag_final_message(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        for part in reversed(content):
            if "text" in part:
                text, part["text"] = part["text"], part["text"] + CONTINUE_TAG
                return text
        raise ChatContentError("continue_final_message is set but the final message has no text",
                               param="messages")
    message["content"] = content + CONTINUE_TAG
    return content


def _cut_after_final_message(rendered: str, final_text: str) -> str:
    tag = CONTINUE_TAG.strip()
    if tag not in rendered or final_text.strip() not in rendered:
        raise ChatTemplateError(
            "continue_final_message is set but the chat template does not render the final "
            "message's content verbatim, so it cannot be continued")
    at = rendered.rindex(tag)
    if rendered[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return rendered[:at]  # the template kept our spacing: the content's own whitespace stays
    return rendered[:at].rstrip()  # the template trimmed the content: trim it the same way
