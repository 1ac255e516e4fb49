"""The rating page in a real headless Chromium: a rater judges with clicks and keys, the
server is killed (SIGKILL) mid-session and restarted, the rater goes on where they were, and
judgements.jsonl holds exactly what was submitted.

With CPE_RATE_SCREENSHOT=docs/img/rate.png the first task's page is saved there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from rate_fixtures import REPO, RateServer, write_samples

from cpe_ray.human.records import read_judgements

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                       reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install "
                              "chromium chromium-driver)"),
    pytest.mark.timeout(240),
]
WAIT_S = 20
PERSONAS = [{"name": "Marta", "age": 34, "occupation": "nurse, night shifts",
             "interests": ["hiking", "budget travel"], "style": "short, practical answers"},
            {"name": "Ken", "age": 61, "occupation": "retired teacher",
             "interests": ["gardening", "history"], "style": "detailed explanations"}]
QUESTIONS = ["Can you suggest a plan for a free weekend in Lisbon?",
             "How should I prepare my garden for the first frost?"]
ANSWERS = [("Saturday: walk Alfama early, free viewpoints, picnic in Parque Eduardo VII. "
            "Sunday: train to Sintra (under 5 EUR), hike to the Moorish Castle.\nSleep in "
            "before your shifts start again.",
            "Lisbon is a wonderful city with a rich history. There are many museums, "
            "restaurants and neighbourhoods to explore, such as Belém, Chiado and Bairro "
            "Alto. You could also consider a day trip."),
           ("Harvest tender crops, mulch the beds 5-8 cm deep, move pots against a south "
            "wall and cover late brassicas with fleece; history note: Victorian gardeners "
            "used cloches the same way.",
            "Cover your plants.")]


def _winrate(folder: Path) -> Path:
    out = folder / "winrate"
    out.mkdir(parents=True)
    rows = [{"id": f"p{i}", "persona": json.dumps(PERSONAS[i]), "question": QUESTIONS[i],
             "model_answer": ANSWERS[i][0], "baseline_answer": ANSWERS[i][1],
             "preference": 1.0, "model_reward": 2.5, "baseline_reward": -1.0}
            for i in range(2)]
    (out / "judgements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1200,800", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    # A 1200x800 viewport, whatever room the headless window's frame takes.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1200, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()


def test_rate_in_browser_with_a_server_kill(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    args = ["--winrate", str(_winrate(tmp_path)), "--samples",
            str(write_samples(tmp_path / "run" / "samples.jsonl", n=2)), "--size", "4",
            "--seed", "1", "--port", str(_free_port()), "--out", str(tmp_path / "out")]
    server = RateServer(*args)
    expected: dict[str, dict] = {}  # task_id -> what the rater chose, by side

    def current() -> dict:
        return browser.execute_script("return task && {id: task.task_id, kind: task.kind};")

    def wait_task(done: int) -> dict:
        wait.until(lambda d: d.find_element(By.ID, "progress").text == f"{done} / 4 done"
                   and current() is not None and current()["id"] not in expected)
        return current()

    def click(css: str) -> None:
        browser.find_element(By.CSS_SELECTOR, css).click()

    def fill(task: dict, k: int) -> dict:
        """Judge the task on screen: keys for the overall choice, clicks for the rest."""
        body = browser.find_element(By.TAG_NAME, "body")
        if task["kind"] == "pair":
            body.send_keys("1" if k % 2 else "3")  # overall: A / B by keyboard
            click("#pref-helpfulness button[data-value='tie']")
            click("#answerA .scores .row:nth-child(2) button[data-value='4']")
            choice = {"preference": {"overall": "A" if k % 2 else "B", "helpfulness": "tie"},
                      "scores": {"A": {"helpfulness": 4}}}
        else:
            for row, value in ((2, "-3"), (3, "0"), (4, "5")):
                click(f"#answerA .scores .row:nth-child({row}) button[data-value='{value}']")
            choice = {"preference": {}, "scores": {"A": {"helpfulness": -3,
                                                         "personalization": 0,
                                                         "naturalness": 5}}}
        browser.find_element(By.ID, "critique").send_keys(f"critique {k}")
        choice["critique"], choice["edit"] = f"critique {k}", None
        if k == 1:  # edit the left answer
            click("#editA")
            area = browser.find_element(By.CSS_SELECTOR, "#answerA textarea")
            area.send_keys(Keys.END, " (edited)")
            choice["edit"] = {"side": "A", "text": area.get_attribute("value")}
        return choice

    def submit_and_next(task: dict, choice: dict) -> None:
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, Keys.ENTER)
        wait.until(ec.visibility_of_element_located((By.ID, "reveal")))
        shown = browser.find_element(By.ID, "revealBody").text
        assert "Which was which: A = " in shown
        expected[task["id"]] = choice
        browser.find_element(By.TAG_NAME, "body").send_keys("n")

    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "rater").send_keys("alice", Keys.ENTER)
        for k in range(2):
            task = wait_task(k)
            choice = fill(task, k)
            if k == 0 and os.environ.get("CPE_RATE_SCREENSHOT"):
                browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
                browser.save_screenshot(str(REPO / os.environ["CPE_RATE_SCREENSHOT"]))
            submit_and_next(task, choice)

        task = wait_task(2)
        choice = fill(task, 2)
        server.kill()  # mid-session: the rater's third answer is on the page, not sent
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, Keys.ENTER)
        wait.until(lambda d: "cannot be reached" in d.find_element(By.ID, "error").text)
        server = RateServer(*args)
        submit_and_next(task, choice)  # the same answer, sent again once the server is back

        wait_task(3)
        browser.refresh()  # a reload: the name is remembered, the page resumes at task 4
        task = wait_task(3)
        assert browser.find_element(By.ID, "rater").get_attribute("value") == "alice"
        submit_and_next(task, fill(task, 3))
        wait.until(lambda d: "All 4 tasks judged" in d.find_element(By.ID, "doneText").text)
    finally:
        server.stop()

    back = read_judgements(tmp_path / "out" / "judgements.jsonl")
    assert [j.task_id for j in back] == list(expected)  # each exactly once, in order
    for j in back:
        sides = dict(zip("AB", j.shown_order, strict=False))
        want = expected[j.task_id]
        assert j.rater == "alice" and j.critique == want["critique"]
        assert j.preference == {d: v if v == "tie" else sides[v]
                                for d, v in want["preference"].items()}
        assert j.scores == {sides[s]: v for s, v in want["scores"].items()}
        edit = want["edit"]
        assert (j.edit is None) if edit is None else (
            j.edit.label == sides["A"] and j.edit.text == edit["text"]
            and j.edit.text.endswith(" (edited)"))
        assert 0 < j.seconds < 120
