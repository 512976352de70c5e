#!/bin/bash
# Multi-host training on SLURM: one process per node, every GPU of the node in it.
# JAX reads the coordinator, process count and process id from SLURM's variables.
#SBATCH --job-name=munet-lits
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120          # SIGTERM two minutes before the limit: a checkpoint is saved
#SBATCH --requeue                  # a pre-empted job is requeued and resumes from the workdir
#SBATCH --output=runs/lits/slurm-%j.out

srun python train.py --config configs/lits.py --workdir runs/lits \
  --config.data.root=/data/LiTS
