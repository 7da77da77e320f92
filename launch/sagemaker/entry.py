"""SageMaker entry point of an mmtrain job (`mmtrain submit sagemaker` ships this directory,
the `mmtrain` package and the recipe to /opt/ml/code).

SageMaker runs it with the job's hyperparameters as `--key value` arguments (`--recipe <file>` and
the recipe overrides), either under torchrun on every host (torch_distributed, GPU instances: this
process is one rank) or once per host (it then starts the host's ranks itself). The mapping of
SageMaker's environment to overrides is in mmtrain/submit/sagemaker.py.
"""

import os
import sys

# The package is shipped next to this file; the container's working directory is not always it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mmtrain.engine.distributed import exit_process  # noqa: E402
from mmtrain.submit.sagemaker import container_main  # noqa: E402

if __name__ == "__main__":
    # A rank's process ends without the interpreter's teardown (exit_process says why).
    exit_process(container_main(sys.argv[1:], entry_script=os.path.abspath(__file__)))
