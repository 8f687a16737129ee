"""The chat page at `/` in a real headless Chromium, against the real gateway and head.

Debian's chromium is driven through Playwright (Playwright's own browser downloads are not
reachable from CI); `tools/install.sh` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright, expect

from flowspec_zmq.client_protocol import Generate
from flowspec_zmq.head_node import prompt_ids
from flowspec_zmq.models import eos_ids
from flowspec_zmq.reference import reference_greedy

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "chat_page.png"
# A two-turn chat; the follow-up in `ar`, which commits one token per verification, so its answer
# must reach the page in several pieces (flowspec may commit a short answer in one verification).
TURNS = (("What is the capital of France?", "flowspec"), ("And of Italy?", "ar"))
MAX_TOKENS = 16
STATS = re.compile(r"^\d+\.\d tokens/s · \d+\.\d\d accepted per verification · \d+ tokens · (ar|flowspec)$")

# Every text the streaming answer (the one that is aria-busy) showed, recorded in the page itself:
# polling from Python could miss the short streaming window.
RECORD_STREAMING = """() => {
  window.seen = [];
  window.recorder?.disconnect();
  window.recorder = new MutationObserver(() => {
    const text = document.querySelector("#messages .assistant[aria-busy='true'] .text");
    if (text) window.seen.push(text.textContent);
  });
  window.recorder.observe(document.querySelector("#messages"), { childList: true, subtree: true, characterData: true });
}"""


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.fail(
        "no chromium on PATH: the chat page test needs Debian's chromium package; "
        "run `bash tools/install.sh` as root or `apt-get update && apt-get install -y chromium`"
    )


def greedy_answer(model_dir: Path, tokenizer, messages: list[dict[str, str]]) -> str:
    """The target's own greedy answer to a conversation, templated exactly as the head does it."""
    ids = prompt_ids(tokenizer, Generate(0, messages=messages))
    tokens = reference_greedy(model_dir, ids, MAX_TOKENS, sorted(eos_ids(model_dir, tokenizer)))
    return tokenizer.decode(tokens, skip_special_tokens=True)


async def ask(page: Page, turn: int, question: str, mode: str) -> tuple[str, str, list[str]]:
    """Type a question, press Enter, wait until the answer has finished; its text, statistics line
    and every text it showed while streaming."""
    await page.select_option("#mode", mode)
    await page.evaluate(RECORD_STREAMING)
    await page.fill("#prompt", question)
    await page.press("#prompt", "Enter")
    answers = page.locator("#messages .assistant")
    await expect(answers).to_have_count(turn)
    answer = answers.nth(turn - 1)
    await expect(answer).not_to_have_attribute("aria-busy", "true", timeout=120_000)
    text = await answer.locator(".text").text_content()
    stats = await answer.locator(".stats").text_content()
    return text or "", stats or "", await page.evaluate("window.seen")


async def test_chat_page_streams_greedy_answers_with_stats(gateway: str, model_dir, tokenizer, tmp_path) -> None:
    executable = chromium_path()
    messages: list[dict[str, str]] = []
    async with async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = await playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 900, "height": 560})
        try:
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(f"{gateway}/")
            await page.fill("#api-key", "test-key")
            await page.fill("#max-tokens", str(MAX_TOKENS))
            for turn, (question, mode) in enumerate(TURNS, 1):
                text, stats, seen = await ask(page, turn, question, mode)
                messages.append({"role": "user", "content": question})
                # The page sends the whole conversation, so the second answer continues the first.
                assert text and text == greedy_answer(model_dir, tokenizer, messages), (question, text)
                messages.append({"role": "assistant", "content": text})
                assert STATS.match(stats) and stats.endswith(mode), stats
                streamed = [s for s in dict.fromkeys(seen) if s]
                assert streamed and streamed[-1] == text, streamed
                if mode == "ar":
                    assert len(streamed) > 1, f"the answer did not arrive piece by piece: {streamed}"
            if os.environ.get("FLOWSPEC_SCREENSHOT"):
                await page.screenshot(path=SCREENSHOT)
            assert not errors, errors
        finally:
            await page.screenshot(path=tmp_path / "chat_page.png")  # also what a failure looked like
            await browser.close()
