"""Stage 2: fine-tune stage 1's ControlNet on the multi-domain set with style prompts.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/stage2.py [mdland train-controlnet arguments]
"""

import sys

from mdland.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    # The shipped `stage2` config unless the submitter names one.
    sys.exit(main(["train-controlnet", *([] if "--config" in args else ["--config", "stage2"]), *args]))
