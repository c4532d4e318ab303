#!/usr/bin/env python3
"""Drives `kubectl exec -it ... -- sh -i` on a pseudo-terminal of its own, as a user at a
terminal would: waits for the prompt, asks `tty` and `stty size`, resizes the terminal and asks
again, then types Ctrl-D after a failing command. Checks each answer and that kubectl ends with
the shell's exit code (1, from `false`). Prints the transcript; exits 1 naming what was wrong.

With --attach, drives `kubectl attach -it POD` to a container running `sh -i` with `tty: true`
the same way: Enter first for a fresh prompt (the shell printed its first one before kubectl
attached), and any exit code of kubectl's (the shell's is the container's, checked by the caller).

usage: terminal.py [--attach] kubectl [args...]
"""
import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios
import time

TIMEOUT = 30


def set_size(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def main():
    command = sys.argv[1:]
    attach = command[:1] == ["--attach"]
    if attach:
        command = command[1:]
    pid, master = pty.fork()
    if pid == 0:
        set_size(0, 33, 101)  # the size kubectl reads at start and sends first
        os.execvp(command[0], command)
    transcript = b""

    def fail(why):
        sys.stdout.write(transcript.decode(errors="replace"))
        sys.exit(f"terminal.py: {why}")

    def expect(pattern, what):
        nonlocal transcript
        deadline = time.monotonic() + TIMEOUT
        start = len(transcript)
        while not re.search(pattern, transcript[start:]):
            left = deadline - time.monotonic()
            if left <= 0:
                fail(f"no {what} in {TIMEOUT} s")
            ready, _, _ = select.select([master], [], [], left)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    data = b""
                if not data:
                    fail(f"kubectl ended before {what}")
                transcript += data

    if attach:
        # kubectl prints its hint before it connects (and before its terminal is raw): press
        # Enter until a prompt answers.
        expect(rb"press(ing)? enter", "kubectl attach's hint")
        deadline = time.monotonic() + TIMEOUT
        while not re.search(rb"[#$] $", transcript):
            if time.monotonic() > deadline:
                fail(f"no prompt in {TIMEOUT} s of pressing Enter")
            os.write(master, b"\r")
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    transcript += os.read(master, 4096)
                except OSError:
                    fail("kubectl ended before a prompt")
    else:
        expect(rb"[#$] $", "prompt")
    os.write(master, b"tty\r")
    expect(rb"/dev/pts/\d+\r\n", "a tty device")

    def size_becomes(size):
        # The size travels on its own stream: ask until the shell sees it.
        deadline = time.monotonic() + TIMEOUT
        while True:
            asked = len(transcript)
            os.write(master, b"stty size\r")
            expect(rb"\r\n\d+ \d+\r\n", "a size")
            if b"\r\n" + size + b"\r\n" in transcript[asked:]:
                return
            if time.monotonic() > deadline:
                fail(f"stty size never said {size.decode()}")
            time.sleep(0.2)

    size_becomes(b"33 101")
    # The terminal grows: kubectl gets SIGWINCH and sends the new size.
    set_size(master, 44, 132)
    size_becomes(b"44 132")
    os.write(master, b"false\r")
    expect(rb"[#$] $", "prompt after false")
    os.write(master, b"\x04")
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:
                data = b""
            transcript += data
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
    else:
        fail("kubectl did not end after Ctrl-D")
    code = os.waitstatus_to_exitcode(status)
    sys.stdout.write(transcript.decode(errors="replace"))
    if attach:
        print(f"\nterminal.py: attached: prompt, tty, stty size 33 101 then 44 132 after a resize, Ctrl-D ended the shell (kubectl {code})")
        return
    if code != 1:
        sys.exit(f"terminal.py: kubectl ended with {code}, not the shell's 1")
    print("\nterminal.py: prompt, tty, stty size 33 101 then 44 132 after a resize, Ctrl-D ended with 1")


if __name__ == "__main__":
    main()
