"""python launch.py --config configs/<exp>.py --workdir DIR [--mode MODE]: the `vgjax` command
run from the repository (vgjax/launch.py holds it)."""

from vgjax import launch

if __name__ == "__main__":
    launch.run()
