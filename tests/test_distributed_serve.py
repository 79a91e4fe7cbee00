"""`mlx_dsv4 serve` under mlx.launch (2 ranks, ring on loopback): rank 0 serves HTTP, rank 1 runs the
same engine steps. Every answer, through the official SDKs, equals the single-process server's for
the same request (tiny-random, float32, greedy or seeded), also with requests batched across ranks
and a client that leaves mid-stream; an idle server outlives the watchdog's timeout; SIGTERM to
rank 0 ends every rank cleanly. Negative control: followers that ignore rank 0's cancellations."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest
from anthropic import Anthropic
from openai import OpenAI

import server_util
from dist_util import ROOT, env, launch_cmd

WATCHDOG_S = 8  # MLX_DSV4_DIST_TIMEOUT of the served ranks: the idle test waits longer than this
CHAT = [{"role": "user", "content": "Hello there"}]
PROMPTS = [("def fib(n):", 24), ("import os\n", 16), ("class Stack:", 20)]


class Launched:
    """mlx.launch -n 2 running `serve` on a free loopback port; output in a temporary file."""

    def __init__(self, entry: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, *entry, "serve", "--model", "tiny-random", "--port", str(self.port),
               "--log-level", "info", "--max-batch", "4"]
        self.proc = subprocess.Popen(launch_cmd(2, cmd), env=env(MLX_DSV4_DIST_TIMEOUT=WATCHDOG_S), cwd=ROOT,
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.time() + 240
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    pytest.fail(f"the server did not come up:\n{self.output()[-3000:]}")
                time.sleep(0.5)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of the launcher's children (mlx.launch execs each rank in its shell)."""
        out = {}
        for pid in subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    envs = f.read().split(b"\0")
            except OSError:
                continue
            rank = [e[9:] for e in envs if e.startswith(b"MLX_RANK=")]
            if rank:
                out[int(rank[0])] = int(pid)
        return out

    def stop(self, timeout: float = 60) -> bool:
        """SIGTERM to rank 0 (as a Ctrl+C or a service manager would end it); True if every rank and
        the launcher exited within `timeout`, else everything is killed."""
        ranks = self.ranks()
        if 0 in ranks:
            os.kill(ranks[0], signal.SIGTERM)
        try:
            self.proc.wait(timeout)
            clean = True
        except subprocess.TimeoutExpired:
            clean = False
        for pid in self.ranks().values():
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return clean and not any(_alive(p) for p in ranks.values())


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def openai(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def chat(url: str, **kw) -> tuple:
    r = openai(url).chat.completions.create(model="tiny-random", messages=CHAT, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens


def completion(url: str, prompt: str, max_tokens: int) -> str:
    stream = openai(url).completions.create(model="tiny-random", prompt=prompt, max_tokens=max_tokens,
                                            temperature=0, stream=True)
    return "".join(c.choices[0].text for c in stream if c.choices)


def message(url: str) -> tuple:
    r = Anthropic(base_url=url, api_key="none", max_retries=0, timeout=120).messages.create(
        model="tiny-random", max_tokens=10, messages=CHAT, extra_body={"temperature": 0})
    return "".join(b.text for b in r.content if b.type == "text"), r.stop_reason, r.usage.output_tokens


def leave_mid_stream(url: str, chunks: int = 3) -> None:
    """A streaming request for many tokens whose client disconnects after a few chunks."""
    body = {"model": "tiny-random", "prompt": "while True:", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        for k, _ in enumerate(r.iter_lines()):
            if k >= chunks:
                break


@pytest.fixture(scope="module")
def truth():
    """The single-process server's answers, one request at a time."""
    with server_util.start() as s:
        yield {"chat": chat(s.url, max_tokens=12, temperature=0),
               "seeded": chat(s.url, max_tokens=12, temperature=0.9, seed=7),
               "message": message(s.url),
               "completions": [completion(s.url, p, n) for p, n in PROMPTS]}


@pytest.fixture(scope="module")
def served():
    s = Launched(["-m", "mlx_dsv4"])
    yield s
    s.stop()


def test_answers_equal_the_single_process_server(served, truth):
    assert chat(served.url, max_tokens=12, temperature=0) == truth["chat"]
    assert chat(served.url, max_tokens=12, temperature=0.9, seed=7) == truth["seeded"]
    assert message(served.url) == truth["message"]
    assert completion(served.url, *PROMPTS[0]) == truth["completions"][0]


def test_batched_requests_and_a_client_that_leaves_stay_exact(served, truth):
    got = [None] * len(PROMPTS)

    def run(i):
        got[i] = completion(served.url, *PROMPTS[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    threads.append(threading.Thread(target=leave_mid_stream, args=(served.url,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert got == truth["completions"]
    assert "cancelled (client gone)" in served.output()  # the client that left did so mid-generation
    # an unseeded sampled request: rank 0 seeds it for every rank, so the ranks stay in step
    openai(served.url).chat.completions.create(model="tiny-random", messages=CHAT, max_tokens=8, temperature=1.0)
    assert chat(served.url, max_tokens=12, temperature=0) == truth["chat"]  # nothing left out of step


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_an_idle_server_outlives_the_watchdog_without_spinning(served, truth):
    follower = served.ranks()[1]
    before, t = cpu_seconds(follower), time.monotonic()
    time.sleep(WATCHDOG_S + 2)  # no model step in flight: the ranks wait for rank 0's next message
    busy = (cpu_seconds(follower) - before) / (time.monotonic() - t)
    # waiting inside the ring's collective would keep a core about half busy (measured: 0.5); the
    # ticks of rank 0's idle messages cost about 0.02
    assert busy < 0.25, busy
    assert message(served.url) == truth["message"]


def test_sigterm_to_rank_0_ends_every_rank(served):
    assert served.stop(timeout=60), served.output()[-3000:]
    out = served.output()
    assert served.proc.returncode == 0 and "Traceback" not in out and "exited with code" not in out, out[-3000:]


def test_a_dead_rank_0_ends_the_follower():
    """Without mlx.launch to stop it (killed first, as when the launching Mac goes away): the
    follower's collective fails and it ends by itself, not waiting or spinning forever."""
    s = Launched(["-m", "mlx_dsv4"])
    ranks = s.ranks()
    try:
        s.proc.kill()
        s.proc.wait()
        os.kill(ranks[0], signal.SIGKILL)
        deadline = time.time() + 30
        while _alive(ranks[1]) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(ranks[1]), s.output()[-2000:]
    finally:
        for pid in ranks.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_negative_control_followers_that_drop_cancellations_break_the_answers(truth):
    s = Launched(["tests/dist_serve_deaf.py"])
    try:
        assert completion(s.url, *PROMPTS[1]) == truth["completions"][1]  # no cancellation yet: still exact
        leave_mid_stream(s.url)
        time.sleep(2)  # rank 0 notices the disconnect (polled every 0.5 s) and cancels the row
        try:
            after = completion(s.url, *PROMPTS[1])
        except Exception:  # noqa: BLE001 - a failed or refused request is the expected outcome too
            after = None
        assert after != truth["completions"][1]
    finally:
        s.stop(timeout=5)
