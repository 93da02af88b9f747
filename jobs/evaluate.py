"""Evaluate a detector: NME / FR@10% / AUC@10%, CED plot, overlays.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/evaluate.py [mdland evaluate arguments]
"""

import sys

from mdland.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
