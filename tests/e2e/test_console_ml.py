"""The console's playground in a real headless Chromium against the session gateway's real
chat engine: an answer streamed token by token, a stopped one, and the curl and Python
snippets that hold the same request (and never the key)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import expect

from llmops.cli.stack import CHAT_MODEL
from tests.browser import Console
from tests.e2e.conftest import API_KEY, Gateway

DOCS = Path(__file__).resolve().parents[2] / "docs" / "console"

# Records the assistant message's text length at every change, to tell a stream from one
# answer arriving whole.
WATCH_ANSWER = """() => {
  window.lengths = [];
  new MutationObserver(() => {
    const answer = document.querySelector('#chat .msg.assistant:last-of-type .text');
    if (answer) window.lengths.push(answer.textContent.length);
  }).observe(document.getElementById('chat'),
             {subtree: true, childList: true, characterData: true});
}"""


def test_playground_streams_an_answer_and_shows_the_request_as_code(
        gateway: Gateway, console: Callable[..., Console]) -> None:
    tab = console(gateway.url)
    tab.sign_in(API_KEY)
    page = tab.open("playground")
    expect(page.locator(f'#pg-model option[value="{CHAT_MODEL}"]')).to_have_count(1)
    page.select_option("#pg-model", CHAT_MODEL)
    page.fill("#pg-system", "You are a terse <b>assistant</b>.")
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", "48")
    page.fill("#pg-input", "Write a short poem about the sea.")

    # The snippets show the request about to be sent; the key is a placeholder.
    curl, python = page.inner_text("#code-curl"), page.inner_text("#code-python")
    sent = json.loads(re.search(r"-d '(.*)'", curl, re.S).group(1))  # type: ignore[union-attr]
    assert sent["model"] == CHAT_MODEL and sent["stream"] is True and sent["max_tokens"] == 48
    assert sent["messages"] == [
        {"role": "system", "content": "You are a terse <b>assistant</b>."},
        {"role": "user", "content": "Write a short poem about the sea."}]
    assert f'model="{CHAT_MODEL}"' in python
    assert '{"role": "user", "content": "Write a short poem about the sea."}' in python
    assert API_KEY not in curl + python and "$OPENAI_API_KEY" in curl
    assert 'os.environ["OPENAI_API_KEY"]' in python

    page.evaluate(WATCH_ANSWER)
    page.click("#pg-send")
    answer = page.locator("#chat .msg.assistant").last
    expect(answer).to_have_attribute("data-state", "done", timeout=60_000)
    text = answer.locator(".text").text_content() or ""
    lengths = page.evaluate("window.lengths")
    growing = sorted({n for n in lengths if 0 < n <= len(text)})
    assert len(growing) > 1 and growing[-1] == len(text), lengths  # more than one step
    assert "completion tokens" in answer.locator(".meta").inner_text()
    # The markup in the system prompt stayed text; the next request carries the answer.
    assert page.locator("#chat b").count() == 0
    assert json.dumps(text, ensure_ascii=False) in page.inner_text("#code-python")
    tab.screenshot("playground")
    DOCS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tab.screenshot("playground-docs", full_page=False), DOCS / "playground.png")

    # Stop: a long answer is cut off where it was, and the page takes the next message.
    page.fill("#pg-max-tokens", "1000")
    page.fill("#pg-input", "Count from one to five hundred in words.")
    page.click("#pg-send")
    second = page.locator("#chat .msg.assistant").last
    page.wait_for_function("""() => {
      const m = [...document.querySelectorAll('#chat .msg.assistant')].pop();
      return m.dataset.state === 'streaming' && m.textContent.length > 0; }""")
    page.click("#pg-stop")
    expect(second).to_have_attribute("data-state", "stopped")
    expect(page.locator("#pg-send")).to_be_enabled()
    expect(page.locator("#pg-stop")).to_be_disabled()
