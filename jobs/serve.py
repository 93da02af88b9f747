"""Serve a detector with Ray Serve; the job runs until it is stopped.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/serve.py [mdland serve arguments]
"""

import sys

from mdland.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    # On a cluster the service must be reachable from outside its node, not only on loopback.
    sys.exit(main(["serve", *([] if "--host" in args else ["--host", "0.0.0.0"]), *args]))
