"""The state the Responses API keeps between calls: stored responses (whose chains of
`previous_response_id` replay as context) and conversations (ordered items that responses
read and append to), each owned by a tenant; and the translation of their items into the chat
messages an engine is sent."""

from conversations.items import (
    InvalidItemError,
    duplicate_id,
    item_id,
    messages_from_items,
    normalize_input,
    output_as_input,
)
from conversations.store import Conversations, DuplicateItemError, Responses

__all__ = ["Conversations", "DuplicateItemError", "InvalidItemError", "Responses",
           "duplicate_id", "item_id", "messages_from_items", "normalize_input",
           "output_as_input"]
