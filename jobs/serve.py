"""Serve a detector with Ray Serve; the job runs until it is stopped.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/serve.py [mdland serve arguments]
"""

import sys

from mdland.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
