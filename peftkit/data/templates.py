"""Chat templates for bases that ship without one (`--chat-template NAME|FILE`): a name from
TEMPLATES or a Jinja file, checked by rendering a conversation before anything loads, set on
the tokenizer, and written beside the run (`chat_template.jinja`, transformers' file name) so
`eval`, `generate` and `serve` render chats the way training did."""

from pathlib import Path

from peftkit.errors import PeftkitError

FILE = "chat_template.jinja"
# ChatML (OpenAI's chat markup, Qwen's and SmolLM2's template): <|im_start|>role\n...<|im_end|>
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Zephyr's markup: <|role|>\n...</s>
ZEPHYR = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + "
    "eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% endif %}")
TEMPLATES = {"chatml": CHATML, "zephyr": ZEPHYR}
SAMPLE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": "a"}]


def chat_template(value: str, flag: str = "--chat-template") -> str:
    """The template text a --chat-template value names, rendered once on a sample conversation
    (a broken template fails here, in one line, not at the first chat record)."""
    if value in TEMPLATES:
        text = TEMPLATES[value]
    else:
        path = Path(value)
        if not path.is_file():
            raise PeftkitError(f"{flag} {value}: neither a template name "
                               f"({', '.join(TEMPLATES)}) nor a file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PeftkitError(f"{flag} {value}: unreadable ({str(e)[:80]})") from None
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    try:
        rendered = ImmutableSandboxedEnvironment().from_string(text).render(
            messages=SAMPLE, add_generation_prompt=True, eos_token="</s>", bos_token="<s>")
    except TemplateError as e:
        raise PeftkitError(f"{flag} {value}: not a usable Jinja chat template "
                           f"({str(e).splitlines()[0][:100]})") from None
    if "a" not in rendered or "u" not in rendered:
        raise PeftkitError(f"{flag} {value}: renders no message contents")
    return text


def use_chat_template(tokenizer, value: str | None, *outs: Path) -> None:
    """Set a --chat-template on `tokenizer` (nothing when None or empty) and write it beside
    each run directory in `outs`."""
    if not value:
        return
    tokenizer.chat_template = chat_template(value)
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
        (out / FILE).write_text(tokenizer.chat_template, encoding="utf-8")


def recorded_template(tokenizer, run: Path) -> None:
    """A run's own template (written by training), if it has one."""
    path = Path(run) / FILE
    if path.is_file():
        tokenizer.chat_template = path.read_text(encoding="utf-8")
