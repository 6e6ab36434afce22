"""What tvgate knows of OpenAI's legacy Completions and of Embeddings.

Both share OpenAI's envelope, key header and usage (:class:`OpenAIAPI`). A legacy
Completions stream is a Chat stream whose choices carry ``text`` pieces instead of a
message delta; an embeddings answer is never streamed, and only its usage and model
are kept (the vectors are no answer a trace shows).
"""

from __future__ import annotations

from tvgate.providers.base import JSON, OPENAI_COMPLETIONS, OPENAI_EMBEDDINGS
from tvgate.providers.common import Assembled, StreamAssembler, as_str
from tvgate.providers.openai_chat import ChatChoice, ChatStream, OpenAIAPI, OpenAIChat, chat_usage


class OpenAICompletions(OpenAIChat):
    """``/v1/completions``: its JSON answer reads as a Chat one does (choices, usage)."""

    api = OPENAI_COMPLETIONS
    client_path = "completions"
    upstream_path = "/completions"

    def stream_assembler(self, max_retained: int) -> StreamAssembler | None:
        return _CompletionsStream(max_retained)


class OpenAIEmbeddings(OpenAIAPI):
    """``/v1/embeddings``."""

    api = OPENAI_EMBEDDINGS
    client_path = "embeddings"
    upstream_path = "/embeddings"

    def assemble(self, obj: JSON) -> Assembled:
        return Assembled(
            None, chat_usage(obj.get("usage")), model=as_str(obj.get("model")), complete=True
        )


COMPLETIONS = OpenAICompletions()
EMBEDDINGS = OpenAIEmbeddings()


class _CompletionsStream(ChatStream):
    """Legacy Completions: ``choices[].text`` pieces instead of a message delta."""

    __slots__ = ()

    _OBJECT = "text_completion"

    def _choice(self, st: ChatChoice, ch: JSON, size: int) -> None:
        text = ch.get("text")
        if text is not None:
            if st.content is None:
                st.content = []
            st.content.append(self._take(text))
        reason = ch.get("finish_reason")
        if reason:
            st.finish_reason = reason
        logprobs = ch.get("logprobs")
        if logprobs and self._charge(size):
            if st.logprobs is None:
                st.logprobs = {}
            for key, value in logprobs.items():
                have = st.logprobs.get(key)
                if isinstance(value, list) and isinstance(have, list):
                    have.extend(value)
                else:
                    st.logprobs[key] = list(value) if isinstance(value, list) else value

    def _build_choice(self, idx: int, st: ChatChoice) -> JSON:
        return {
            "text": "".join(st.content or ()),
            "index": idx,
            "logprobs": st.logprobs,
            "finish_reason": st.finish_reason,
        }
