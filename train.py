"""Train a registered model on an ImageFolder dataset.

    python train.py --config configs/demo_fashion_mnist.yaml [--lr 0.05 --epochs 3 ...]
    msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1 --master_port=8118 --log_dir=runs/msrun \
        --join=True train.py --config ...          # data parallel (HCCL on Ascend, NCCL on GPU, CPU collectives)

Every option (``python train.py --help``) can be set in the YAML file and overridden on the command line.
Exit codes: 0 done, 2 bad configuration / data / checkpoint, 3 the loss diverged (NaN/inf).
"""
import sys


def main(argv=None):
    from engine.config import ConfigError, load_config
    try:
        cfg, print_only = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if print_only:
        print(cfg.to_yaml(), end="")
        return 0
    from engine.checkpoint import CheckpointError  # after parsing: --help stays fast (it loads the models)
    from engine.data import DataError
    from engine.runtime import ModelBuildError
    try:
        from engine.trainer import TrainingDiverged, train
        try:
            train(cfg)
        except TrainingDiverged as err:
            print(f"error: {err}", file=sys.stderr)
            return 3
    except (ConfigError, DataError, CheckpointError, ModelBuildError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
