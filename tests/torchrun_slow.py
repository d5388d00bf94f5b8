"""train.py whose rank 0 sleeps through the rollout of step 2, for tests/test_torchrun.py: a stop sent to the torchrun
agent must reach the ranks inside that step (the agent kills them when they take more than 30 s)."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

real = train.roll_out_and_grade


def slow(run, step):
    if step == 1 and run.rank == 0:
        time.sleep(600)
    return real(run, step)


if __name__ == "__main__":
    train.roll_out_and_grade = slow
    train.main(sys.argv[1:])
