"""Defaults shared by every experiment: the benchmark's options (reference.md §1.1) in sections.

Option names are the PyTorch benchmark's, so its command lines translate one to one:
`--resize 240 320` becomes `--config.data.resize='(240, 320)'`, `--test_method maj_voting`
becomes `--config.eval.test_method=maj_voting`. Options are grouped into data, model, train,
mining and eval. Unset optional values are typed placeholders (None until given).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.mode = "eval"  # what launch.py runs when --mode is not given
    config.seed = 0

    config.data = ml_collections.ConfigDict(dict(
        datasets_folder="",  # root of the datasets; empty: the DATASETS_FOLDER environment variable
        dataset_name="pitts30k",  # reads <datasets_folder>/<dataset_name>/images/<split>
        synthetic="",  # aerial | cosplace | doom | gsv: render a built-in synthetic dataset there if missing
        synthetic_frames=600,  # doom: frames per database walk and per query walk, in each split
        resize=(480, 640),  # H, W for training and inference; or "80%": that share of the dataset's image size
        infer_batch_size=16,
        num_workers=2,  # host threads decoding images
        packed_folder="",  # tfds data_dir: training reads its images packed at `resize` here (mode pack; vgjax.data.packed)
        packed_encoding="jpeg",  # jpeg | raw (5-20x faster to read, ~0.9 MB per 480x640 image): how mode pack stores images
        gsv_cities_folder="",  # mode train_gsv: the GSV-Cities root (Dataframes/, Images/); relative: to the dataset folder
        gsv_cities=(),  # its cities to train on; empty: GSV-Cities' 23 training cities
        val_positive_dist_threshold=25.0,  # metres: val positives, test positives (unless eval.positive_dist_threshold), train soft positives
        train_positives_dist_threshold=10.0,  # metres: train hard positives
    ))

    config.model = ml_collections.ConfigDict(dict(
        backbone="resnet18conv4",
        aggregation="netvlad",
        l2="before_pool",
        netvlad_clusters=64,
        convap_out_channels=512,  # Conv-AP: 1x1 conv channels, and its pooled grid (s1, s2)
        convap_pool=(2, 2),
        mixvpr_out_channels=1024,  # MixVPR: channel and row projections, Feature-Mixer blocks, MLP ratio
        mixvpr_out_rows=4,
        mixvpr_mix_depth=4,
        mixvpr_mlp_ratio=1,
        salad_clusters=64,  # SALAD (after DINOv2): clusters m, their dimension l, the CLS token's g, dropout
        salad_cluster_dim=128,
        salad_token_dim=256,
        salad_dropout=0.3,
        boq_proj_channels=384,  # BoQ: projected channels d (its DINOv2 release: 384, ResNet-50: 512), queries,
        boq_queries=64,  # blocks, and the output rows (descriptor: d x rows)
        boq_layers=2,
        boq_row_dim=32,
        fc_output_dim=config_dict.placeholder(int),
        pretrain="imagenet",  # imagenet | places365 (resnet18) | none | random (evaluated on purpose) | a weights file
        trunc_te=config_dict.placeholder(int),
        freeze_te=config_dict.placeholder(int),
        unfreeze_n_blocks=config_dict.placeholder(int),  # DINOv2: train only its last N blocks (+ final norm); None: all
        dtype="float32",  # compute dtype: float32 | bfloat16 (params stay float32)
        frozen_bn=False,  # True: BatchNorm of frozen stages stops updating its statistics
        resume="",  # a whole network to evaluate or to start training from: a weights file or a vgjax workdir
        resume_checkpoint="best",  # of a vgjax workdir: best | last
        resume_format="benchmark",  # benchmark (zoo / train.py files) | cosplace (torch.hub files) | gsv (MixVPR / Conv-AP / SALAD files) | boq | megaloc
    ))

    config.train = ml_collections.ConfigDict(dict(
        train_batch_size=4,  # triplet: query tuples per step; CosPlace: classes (images) per step; GSV: places per step
        criterion="triplet",
        margin=0.1,
        epochs_num=1000,
        patience=3,  # epochs without a better best_metric before stopping; 0: never stop early
        lr=1e-5,
        warmup_steps=0,  # >0: lr rises linearly over the first N steps (GSV-Cities, MixVPR)
        warmup_epochs=0,  # the same in epochs of steps (BoQ), for methods with fixed epochs
        lr_decay_steps=0,  # >0: lr falls linearly to lr_end_factor x lr over N steps, then stays (torch LinearLR; SALAD)
        lr_end_factor=0.2,
        lr_milestones=(),  # epochs at which lr is multiplied by lr_gamma (torch MultiStepLR), e.g. (5, 10, 15)
        lr_gamma=0.3,
        lr_crn_layer=5e-3,
        lr_crn_net=5e-4,
        optim="adam",  # adam | sgd (momentum 0.9, weight decay 1e-3) | adamw (weight_decay)
        weight_decay=0.01,  # adamw's decoupled weight decay (torch AdamW's default; SALAD uses 9.5e-9)
        best_metric="R@5",  # the validation recall that picks the best checkpoint and drives patience
        log_every_steps=50,  # read the loss back from the device (and log it) every N steps
        checkpoint_every_steps=0,  # also checkpoint inside a round every N steps (0: rounds only)
        keep_checkpoints=2,  # the newest N checkpoints are kept, and the best one
        profile_steps=0,  # >0: a JAX profiler trace of that many steps into <workdir>/profile
        # Multi-process (several hosts, or processes on one machine): jax.distributed.initialize
        # with these three settings, each from its key or else from $JAX_COORDINATOR_ADDRESS,
        # $JAX_NUM_PROCESSES, $JAX_PROCESS_ID; with none of them, JAX detects SLURM, TPU pods...
        distributed=False,
        coordinator_address=config_dict.placeholder(str),  # "host:port" of process 0
        num_processes=config_dict.placeholder(int),
        process_id=config_dict.placeholder(int),
        heartbeat_timeout_seconds=100,  # a process silent this long counts as dead: the others stop
        # Augmentations (triplet: the queries only, benchmark order; CosPlace: every image,
        # colour jitter in a random order per image).
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        hue=0.0,
        rand_perspective=0.0,
        horizontal_flip=False,
        random_resized_crop=0.0,  # scale range (1 - x, 1)
        random_rotation=0.0,
    ))

    config.mining = ml_collections.ConfigDict(dict(
        mining="partial",
        cache_refresh_rate=1000,
        queries_per_epoch=5000,
        negs_num_per_query=10,
        neg_samples_num=1000,
    ))

    # GSV-Cities training (mode train_gsv): places x K batches (train.train_batch_size places),
    # the multi-similarity miner and loss as GSV-Cities and MixVPR configure them.
    config.gsv = ml_collections.ConfigDict(dict(
        images_per_place=4,
        min_images_per_place=4,  # places with fewer images are dropped
        shuffle_all=False,  # False: places shuffled within each city, cities in order (GSV-Cities' loader)
        miner_epsilon=0.1,
        ms_alpha=1.0,
        ms_beta=50.0,
        ms_base=0.0,
    ))

    # CosPlace training (mode train_cosplace), reference.md §5: its folders, the partition into
    # classes and groups, and its classifiers. lr, optimizer, epochs, patience, batch size and
    # augmentations are the train section's.
    config.cosplace = ml_collections.ConfigDict(dict(
        train_folder="", val_folder="", test_folder="",  # absolute, or relative to <datasets_folder>/<dataset_name>
        test_queries_folder="queries_v1",
        M=10, alpha=30, N=5, L=2, groups_num=8, min_images_per_class=10,
        train_all_layers=False,
        iterations_per_epoch=10000,
        classifiers_lr=0.01,
    ))

    config.eval = ml_collections.ConfigDict(dict(
        split="test",
        datasets=(),  # --mode eval: names under data.datasets_folder (e.g. pitts30k,msls); empty: data.dataset_name
        test_method="hard_resize",  # one, several separated by commas, or all
        majority_weight=0.01,
        recall_values=(1, 5, 10, 20),
        positive_dist_threshold=config_dict.placeholder(float),  # metres: test positives; None: data.val_positive_dist_threshold
        resize=(),  # H, W of validation and test images; empty: data.resize (SALAD trains at 224, tests at 322)
        pca_dim=config_dict.placeholder(int),
        pca_dataset_folder="",  # relative to datasets_folder, e.g. pitts30k/images/train
        index="flat",  # faiss index kind, see vgjax.index.INDEX_KINDS
        index_params="",  # e.g. "nlist=1024,nprobe=16"
        save_descriptors=False,  # write .npy descriptors + CSV/JSON into <workdir>/descriptors
        save_predictions=False,  # write predictions.csv: each query's top-k, their positions and distances (always without labels)
        num_preds_to_save=0,  # >0: pictures of queries and their top-N predictions, a recall plot, a map
        save_only_wrong_preds=False,  # pictures only of queries whose top-1 is wrong
        queries_to_save=20,  # how many queries (evenly spread over the split) get a picture
    ))

    # Sweeps (--mode sweep, vgjax.sweep): repeated runs of this config over seeds and options,
    # one workdir per run under the sweep's workdir, then a mean +- std table and plots.
    config.sweep = ml_collections.ConfigDict(dict(
        mode="train",  # what each run does: train | train_cosplace | train_gsv | eval
        seeds=1,  # runs per combination, with seeds seed, seed + 1, ...
        axes="",  # "key=value|value|...; key=...": config keys and their values, written as on the command line
        zip=False,  # False: every combination of the axes' values; True: their i-th values together
        parallel_runs=1,  # runs at once, each on its share of the GPUs; 1: one after the other
    ))
    return config
