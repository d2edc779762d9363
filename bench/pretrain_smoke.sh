#!/usr/bin/env bash
# Short CIFAR-10 pretraining runs of every method with the shipped GPU recipes (CUDA path check:
# bf16 autocast, channels_last, the ffcv loader, online kNN). Usage: bench/pretrain_smoke.sh [EPOCHS]
# Data: $SSLAB_DATA_ROOT (default ../shared/data). Prints each run's result table.
set -uo pipefail
epochs=${1:-10}
sslab() { python -m sslab "$@"; }
sslab data prepare --dataset cifar10 --quiet
for method in swav dino sdmp supcon simclr; do
  echo "=== $method, $epochs epochs"
  extra=()
  # the recipe's queue starts at epoch 30; start it early in a short run
  [ "$method" = swav ] && extra=(--set method.queue_start_epoch=$((epochs / 2)))
  [ "$method" = dino ] && extra=(--set method.warmup_teacher_temperature_epochs=$((epochs / 2)))
  # our faster variants (bench/recipes.py), not solo-learn's 1000-epoch <method>_cifar10.yaml
  case $method in swav|dino) config=${method}_cifar10_multicrop ;; supcon|simclr) config=${method}_cifar10_200ep ;;
    *) config=${method}_cifar10 ;; esac
  sslab pretrain --local --quiet --name "smoke-$method-$epochs" --config "configs/pretrain/${config}.yaml" \
    --set train.epochs="$epochs" --set optim.warmup_epochs=1 --set knn.every_epochs="$epochs" \
    --set train.resume=null "${extra[@]}" 2>&1 | grep -v -i warn | tail -12
done
