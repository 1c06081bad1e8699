#!/bin/bash
# Data-parallel training on several hosts under Slurm: one process per host,
# each driving all of its host's GPUs; JAX reads the job layout from Slurm's
# environment (--distributed), so no addresses are needed.
#
#   sbatch launch/slurm_train.sh configs/shakespeare_char.py runs/shakespeare_2x8
#   sbatch launch/slurm_train.sh configs/frost_t4.py runs/frost_t4_2x8 --config.train.batch_size=256
#
# The workdir must be on a filesystem every host sees: all processes write the
# checkpoints together; only process 0 writes logs, metrics and the sample.
# Rerunning the same command resumes from the latest checkpoint, on any number
# of hosts or GPUs (the global batch must divide by the number of GPUs).
#SBATCH --job-name=minigpt_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=01:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch launch/slurm_train.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]}
WORKDIR=${2:?usage: sbatch launch/slurm_train.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]}
shift 2
cd "${SLURM_SUBMIT_DIR:-.}"
srun python launch/train.py --config="$CONFIG" --workdir="$WORKDIR" --distributed "$@"
