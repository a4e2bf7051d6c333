"""The text layer of the OpenAI-compatible endpoint: no HTTP, no torch.

    chat_template.py  messages -> prompt text, with the checkpoint's Jinja chat template
    detokenize.py     token ids -> streamed text pieces; stop strings cut out of the stream
    protocol.py       OpenAI request bodies -> checked requests; response and SSE chunk bodies
"""

from .chat_template import ChatTemplate, ChatTemplateError, MessageError, NoChatTemplate, validate_messages
from .detokenize import IncrementalDetokenizer, StopStrings
from .protocol import (
    SSE_DONE, ApiError, ChatRequest, CompletionRequest, chat_chunk, chat_response, completion_chunk,
    completion_response, new_id, sse, usage, usage_chunk,
)

__all__ = [
    "ApiError", "ChatRequest", "ChatTemplate", "ChatTemplateError", "CompletionRequest", "IncrementalDetokenizer",
    "MessageError", "NoChatTemplate", "SSE_DONE", "StopStrings", "chat_chunk", "chat_response", "completion_chunk",
    "completion_response", "new_id", "sse", "usage", "usage_chunk", "validate_messages",
]
