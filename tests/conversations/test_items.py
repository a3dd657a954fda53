"""Responses API items as stored and as the chat messages an engine is sent."""

from __future__ import annotations

import pytest

from conversations import InvalidItemError, messages_from_items, normalize_input, output_as_input


def test_a_string_input_is_one_user_message_with_an_id() -> None:
    [item] = normalize_input("Hello")
    assert item["id"].startswith("msg_") and item["status"] == "completed"
    assert item["content"] == [{"type": "input_text", "text": "Hello"}]
    assert messages_from_items([item]) == [{"role": "user", "content": "Hello"}]


def test_function_calls_and_their_outputs_become_tool_messages() -> None:
    items = normalize_input([
        {"role": "developer", "content": "Be brief."},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"a\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "two"}]},
    ])
    messages = messages_from_items(items)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]  # one assistant turn
    assert messages[2:] == [{"role": "tool", "tool_call_id": "c1", "content": "one"},
                            {"role": "tool", "tool_call_id": "c2", "content": "two"}]


def test_an_assistant_turn_is_replayed_as_its_text() -> None:
    output = [{"id": "fs_1", "type": "file_search_call"},
              {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "Paris.", "annotations": []}]}]
    replayed = output_as_input(output)
    assert [i["id"] for i in replayed] == ["msg_1"]
    assert messages_from_items(replayed) == [{"role": "assistant", "content": "Paris."}]


@pytest.mark.parametrize(("item", "param"), [
    ({"type": "item_reference", "id": "x"}, "input[0].type"),
    ({"role": "robot", "content": "hi"}, "input[0].role"),
    ({"role": "user", "content": []}, "input[0].content"),
    ({"role": "user", "content": [{"type": "input_file", "file_id": "f"}]},
     "input[0].content[0].type"),
    ({"type": "function_call", "call_id": "c", "name": "f"}, "input[0].arguments"),
    ({"type": "function_call_output", "output": "x"}, "input[0].call_id"),
])
def test_a_bad_item_names_where_it_is(item: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidItemError) as err:
        normalize_input([item])
    assert err.value.param == param
