"""The ``viscpm`` console script: `viscpm.apps.cli.main`, with Ctrl-C handled from the first moment.

Importing the command line takes seconds (``import viscpm`` loads torch and transformers to register the Auto
classes). This module stands outside the ``viscpm`` package, so it runs before any of that: until the command line
is loaded, Ctrl-C prints the one line an interrupted command prints and exits 130, instead of a traceback through
the imports. From then on `viscpm.apps.cli.main` handles it.
"""

import os
import signal
import sys


def _interrupted_while_loading(signum, frame):
    os.write(2, b"interrupted\n")  # as viscpm.apps.cli reports an interrupted command
    os._exit(130)  # nothing has been done yet: nothing to clean up


def main() -> int:
    catch = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not when started with SIGINT ignored
    if catch:
        signal.signal(signal.SIGINT, _interrupted_while_loading)
    from viscpm.apps.cli import main as cli_main

    if catch:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    status = cli_main()
    if catch:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while Python shuts down changes nothing
    return status


if __name__ == "__main__":
    sys.exit(main())
