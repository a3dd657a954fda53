"""Fine-tune promotion's pieces that need no engine: who sees a withheld adapter (or one whose
owner is not known yet), and the questions a validation file becomes."""

from __future__ import annotations

import pytest

from finetune.dataset import Example
from finetune.promotion import PromotionError, validation_data_source
from llmops.catalog import Catalog
from llmops.settings import ModelConfig

BASE = ModelConfig(name="chat", kind="chat", pools=[{"device": "cpu", "urls": ["http://x"]}])


def test_a_withheld_adapter_is_seen_by_admins_and_delegated_workers_only() -> None:
    catalog = Catalog([BASE])
    catalog.set_adapters("chat", ["ft:chat:a:1"])
    catalog.owners["ft:chat:a:1"] = "ten_a"
    entry = catalog.resolve("ft:chat:a:1")
    assert entry is not None
    assert catalog.visible_to(entry, "ten_a", admin=False)
    catalog.withheld.add("ft:chat:a:1")
    assert not catalog.visible_to(entry, "ten_a", admin=False)
    assert catalog.visible_to(entry, "ten_a", admin=False, delegated=True)
    assert catalog.visible_to(entry, "ten_admin", admin=True)
    assert not catalog.visible_to(entry, "ten_b", admin=False, delegated=True)  # not its owner


def test_a_fine_tuned_adapter_whose_owner_is_not_known_yet_is_nobodys() -> None:
    """An engine may report an adapter another gateway loaded before this one has read whose
    it is: until then only admins see it. Adapters an operator loaded are shared."""
    catalog = Catalog([BASE])
    catalog.set_adapters("chat", ["ft:chat:a:1", "support-style"])
    tuned, shared = catalog.resolve("ft:chat:a:1"), catalog.resolve("support-style")
    assert tuned is not None and shared is not None
    assert not catalog.visible_to(tuned, "ten_b", admin=False)
    assert catalog.visible_to(tuned, "ten_admin", admin=True)
    assert catalog.visible_to(shared, "ten_b", admin=False)
    catalog.owners["ft:chat:a:1"] = "ten_a"
    assert catalog.visible_to(tuned, "ten_a", admin=False)
    assert not catalog.visible_to(tuned, "ten_b", admin=False)


def test_validation_examples_become_questions_with_their_answers_as_references() -> None:
    examples = [Example(({"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Warranty?"},
                         {"role": "assistant", "content": "7 years."}), 12)]
    source = validation_data_source(examples, seed=3, max_tokens=32)
    assert source["source"]["content"] == [{"item": {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Warranty?"}],
        "reference": "7 years."}}]
    assert source["input_messages"] == {"type": "item_reference",
                                        "item_reference": "item.messages"}
    assert source["sampling_params"] == {"temperature": 0.0, "max_completion_tokens": 32,
                                         "seed": 3}


def test_a_validation_file_without_answers_cannot_judge() -> None:
    with pytest.raises(PromotionError):
        validation_data_source([Example(({"role": "user", "content": "Hi"},), 2)], 0, 8)
