"""Generate the synthetic set with Ray Data generation actors (`--config gen.yaml`).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/generate.py [mdland generate arguments]
"""

import sys

from mdland.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    # The shipped `generate` config unless the submitter names one.
    sys.exit(main(["generate", *([] if "--config" in args else ["--config", "generate"]), *args]))
