"""Fine-tune the STAR detector on the synthetic set.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/train_detector.py [mdland train-detector arguments]
"""

import sys

from mdland.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    # The shipped `finetune` config unless the submitter names one.
    sys.exit(main(["train-detector", *([] if "--config" in args else ["--config", "finetune"]), *args]))
