"""Stage 1: train the landmark ControlNet on real faces with empty prompts.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/stage1.py [mdland train-controlnet arguments]
"""

import sys

from mdland.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    # The shipped `stage1` config unless the submitter names one.
    sys.exit(main(["train-controlnet", *([] if "--config" in args else ["--config", "stage1"]), *args]))
