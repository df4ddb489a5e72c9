"""Run a test module's tests in reverse or shuffled order, to prove none depends on another.

    python tests/run_in_order.py reversed tests/test_faults.py
    python tests/run_in_order.py shuffled tests/test_faults.py [SEED]

CI runs the fault suite reversed (.ci/run); the normal run covers the written order.
"""
import random
import subprocess
import sys

import pytest


def main(argv):
    order, path = argv[0], argv[1]
    listed = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only",
                             "-p", "no:cacheprovider", path],
                            capture_output=True, text=True, check=True).stdout
    ids = [line for line in listed.splitlines() if "::" in line]
    if order == "reversed":
        ids.reverse()
    elif order == "shuffled":
        seed = int(argv[2]) if len(argv) > 2 else random.randrange(10 ** 6)
        print("shuffled with seed %d" % seed)
        random.Random(seed).shuffle(ids)
    else:
        sys.exit("order must be 'reversed' or 'shuffled'")
    return pytest.main(["-q", "-p", "no:cacheprovider"] + ids)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
