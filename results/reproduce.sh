#!/usr/bin/env bash
# Reproduces everything in results/ from the shared CIFAR-10 copy, on the machine the README names.
#   bash results/reproduce.sh            # from the repository root, in the project's virtual environment
# Each step is resumable: the classifier run continues from its last checkpoint if one exists.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
RUN=logs/reference/version_0
COMPUTE_WEIGHT=${COMPUTE_WEIGHT:-0.5}  # the shipped agent's; the sweep trains all of 0.1 0.25 0.5 1 2

# 1. The reference classifier: configs/cifar10.yaml as committed (30 epochs).
resume=()
[[ -f $RUN/checkpoints/last.ckpt ]] && resume=(--ckpt_path "$RUN/checkpoints/last.ckpt")
/usr/bin/time -f "classifier training: %e s wall" \
  eecnn fit --config configs/cifar10.yaml --data.data_dir "$DATA" \
    --trainer.logger.init_args.name reference --trainer.logger.init_args.version 0 "${resume[@]}"

# 2. Ship it in fp16, with its TensorBoard events for the training-curve plot.
eecnn-export "$RUN/checkpoints/last.ckpt" results/classifier.ckpt --half
cp "$RUN"/events.out.tfevents.* "$RUN/config.yaml" results/
mv results/config.yaml results/classifier-config.yaml

# 3. The agent at several compute weights against the threshold baselines, on the shipped classifier.
/usr/bin/time -f "sweep: %e s wall" \
  eecnn-sweep --classifier-ckpt results/classifier.ckpt --output results/sweep -- --model.data_dir "$DATA"

# 4. Ship the agent at COMPUTE_WEIGHT (its best-validation-reward checkpoint) and test it through the engine.
agent=$(python -c "import json, sys; rows = json.load(open('results/sweep/sweep.json'));
print(next(r['checkpoint'] for r in rows if r.get('compute_weight') == float(sys.argv[1])))" "$COMPUTE_WEIGHT")
eecnn-export "$agent" results/agent.ckpt
eecnn test --ckpt_path results/agent.ckpt --model.data_dir "$DATA" \
  --trainer.logger.init_args.save_dir results --trainer.logger.init_args.name "" \
  --trainer.logger.init_args.version report

# 5. Benchmarks, each in one process on this machine.
python benchmarks/train_throughput.py --data "$DATA" --output results/train_throughput.json
python benchmarks/inference_throughput.py --agent results/agent.ckpt --data "$DATA" \
  --output results/inference_throughput.json
python benchmarks/agent_training.py --classifier-ckpt results/classifier.ckpt --data "$DATA" \
  --output results/agent_training.json
