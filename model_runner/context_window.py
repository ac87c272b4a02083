"""The context-window rule, stated once: the runner refuses a prompt that leaves no room to generate
(ModelRunner.check_prompt, for every engine), and the API refuses a max_tokens beyond the room the prompt leaves
(api/schemas.py sampling_params, a 400 context_length_exceeded). Both ask this module."""
from __future__ import annotations

from .errors import ContextLengthExceeded, InvalidRequestError


def room(num_prompt_tokens: int, max_model_len: int) -> int:
    """Tokens the window leaves to generate after the prompt (<= 0: none)."""
    return max_model_len - num_prompt_tokens


def check_prompt_fits(num_prompt_tokens: int, max_model_len: int) -> None:
    """A prompt must leave room for at least one generated token."""
    if room(num_prompt_tokens, max_model_len) <= 0:
        raise InvalidRequestError(f"the prompt has {num_prompt_tokens} tokens; this model's context window is "
                                  f"{max_model_len}, leaving no room to generate")


def check_max_tokens_fit(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """prompt + max_tokens must fit the window: a max_tokens beyond the room is refused with both numbers, never
    quietly cut. A prompt that leaves no room at all is check_prompt_fits' refusal, not this one's."""
    left = room(num_prompt_tokens, max_model_len)
    if 0 < left < max_tokens:
        raise ContextLengthExceeded(f"max_tokens is {max_tokens} but the prompt has {num_prompt_tokens} tokens and "
                                    f"the context window is {max_model_len} tokens, leaving room for {left}: ask for "
                                    f"at most {left} or shorten the prompt")
