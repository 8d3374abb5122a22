"""The base config: every section of promed_jax with the paper's values as named fields.

Stage files (`shapley.py`, `mcts.py`, `sft.py`, `rl.py`, `eval.py`) start from `get_config()` and pick a
preset with `apply_preset`. Sections are owned by the code that reads them; add fields to your own section
with small edits. A comment "paper" marks a value taken from ../shared/reference/promed.md.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("tiny", "smollm", "qwen7b", "llama8b")

# Relative paths in configs are resolved against the repository root (see promed_jax.data.resolve_path).
MEDQA_PATH = "../shared/data/medqa_dev_convo.jsonl"
CMB_PATH = "../shared/data/cmb_atomic_patient_train.json"


def model_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "tiny"  # 'tiny' (random, seeded) | 'hf' (a Hugging Face folder) | 'gguf' (SmolLM2 by default)
    c.path = ""  # HF folder or .gguf file; empty with kind='gguf' means the SmolLM2 package's file
    c.dtype = "float32"  # activations
    c.param_dtype = "float32"
    c.remat = False
    c.seed = 0
    c.lora_rank = 8  # paper
    c.lora_alpha = 32.0  # paper
    c.lora_dropout = 0.1  # paper
    c.lora_targets = ("q_proj", "v_proj")  # paper
    # Sizes of the random tiny model (kind='tiny'); vocab_size comes from the tiny tokenizer.
    c.tiny = ml_collections.ConfigDict()
    c.tiny.hidden_size = 64
    c.tiny.intermediate_size = 128
    c.tiny.num_layers = 2
    c.tiny.num_heads = 4
    c.tiny.num_kv_heads = 2
    c.tiny.head_dim = 16
    c.tiny.max_position_embeddings = 8192
    return c


def data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "synthetic"  # 'synthetic' (the synthetic clinic) | 'files' (the paths below)
    c.paths = ()  # files to load when kind='files'; relative paths are relative to the repository root
    c.sources = ()  # one source name per path ('' = the file's stem): ids are `<source>:<original id>`
    c.format = ""  # '' = detect from content | 'mediq' | 'promed_medqa' | 'cmb'
    c.initial_info = ""  # '' = the format's default (paper) | 'first_sentence' | 'half_facts'
    c.on_error = "skip"  # a malformed record: 'skip' (counted and logged) | 'raise'
    # Selection (promed_jax/data/sources.py), in this order: split, ids, fact range, limit.
    c.split = ""  # 'train' | 'dev' | 'test' | 'all'; '' = the stage's: train for training stages, test for eval
    c.split_fractions = (0.8, 0.1, 0.1)  # train, dev, test, by a hash of the case id
    c.ids = ()  # only these case ids (each must exist and be in the split)
    c.min_facts = 0
    c.max_facts = 0  # 0 = no bound
    c.limit = 0  # keep only the first `limit` selected cases per file; 0 = all
    c.synthetic_n = 64  # cases of the synthetic clinic
    c.synthetic_seed = 0
    return c


def consult_config() -> ml_collections.ConfigDict:
    """The consultation protocol (promed.md §1), shared by MCTS, RL rollouts and evaluation."""
    c = ml_collections.ConfigDict()
    c.max_questions = 10  # paper: the 11th doctor turn must answer
    return c


def patient_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # 'semantic' (offline, verbatim facts, understands paraphrase; falls back to fact_select with a warning
    # where all-MiniLM-L6-v2 is not installed) | 'fact_select' (offline, lexical) | 'llm' (our model) | 'openai'
    c.kind = "semantic"
    c.temperature = 0.7  # paper: the patient simulator samples at 0.7
    c.max_tokens = 256
    # fact_select: a fact answers a question when it holds this IDF-weighted share of the question's content
    # words; at most max_facts facts are returned, best first (semantic too).
    c.threshold = 0.5
    c.max_facts = 2
    # semantic (promed_jax/consult/retrieval.py): a fact's score is cos + contrast_weight * (cos - mean cos
    # of the case's facts) - hub_weight * hub + lexical_weight * bm25 / (bm25 + 1); facts scoring at least
    # semantic_threshold are returned, a later one only within margin of the best. Chinese cases (no
    # encoder) are scored bm25 / (bm25 + 1) over character bigrams against zh_threshold. Chosen on
    # tests/data/natural_questions_tune.jsonl only (experiments/patient_questions.py tune).
    c.contrast_weight = 1.0
    c.hub_weight = 1.0
    c.lexical_weight = 0.8
    c.semantic_threshold = 0.42
    c.margin = 0.1
    c.zh_threshold = 0.5
    return c


def backend_config() -> ml_collections.ConfigDict:
    """An OpenAI-compatible chat server for the patient / understanding / judge roles (paper: Qwen2.5-72B)."""
    c = ml_collections.ConfigDict()
    c.base_url = "http://127.0.0.1:8000/v1"
    c.model = "Qwen2.5-72B-Instruct"  # paper: patient and judge model
    c.api_key_env = "OPENAI_API_KEY"  # the key is read from this environment variable, never stored
    c.temperature = 0.7  # paper
    c.timeout_s = 60.0
    c.max_retries = 3
    return c


def shapley_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # used above exact_max_n: 'kernel_shap' | 'antithetic' | 'tmc' (paper) | 'permutation' (promed_jax.shapley).
    # kernel_shap (paired, sizes 1 and n-1 enumerated first): on 36 SmolLM2/MedQA games with 5-10 facts it had
    # the lowest L1 error of the sampling estimators at every budget (experiments/study_estimators.py). Its edge
    # over the paper's truncated Monte-Carlo shrinks as n grows: at 4(n+1) coalitions it lost at n = 10
    # (median 0.50 vs 0.42), at 8(n+1) it won at every n (n = 10: 0.29 vs 0.42), hence 8 per fact above 10.
    # Above 10, against exact tables: 4 SmolLM2 games with 11-12 facts, median L1 0.29 vs tmc 0.45, and 13
    # random-weight tiny-model games with 11-15 facts, 0.26 vs 0.48 (README, Shapley). Not measured above 15.
    c.estimator = "kernel_shap"
    c.exact_max_n = 10  # exact enumeration up to this many facts (our decision, promed.md §2)
    c.budget = 0  # distinct coalitions per case for kernel_shap / antithetic / permutation; 0: budget_per_fact
    c.budget_per_fact = 8  # budget = budget_per_fact * (n + 1) when budget is 0 (tmc: its own stopping rules)
    c.min_permutations = 3  # paper: truncated Monte-Carlo, at least 3 permutations
    c.max_permutations = 50  # paper: at most 50 permutations
    c.truncation_tol = 0.01  # paper: a permutation stops once |v(prefix) - v(F)| < 0.01
    c.convergence_tol = 0.01  # paper: sampling stops when the mean change of phi is < 0.01
    c.batch_permutations = 4  # tmc: permutations walked together, one forward per prefix length
    c.tau = 2.0  # paper: w = softmax(phi / tau)
    c.weighting = "shapley"  # 'shapley' (paper) | 'uniform' (ablation: no Shapley weighting)
    c.sig_mode = "exact"  # 'exact' (facts revealed verbatim) | 'paper' (understanding LLM + judge)
    # Per-case caps (so a pathological case cannot run for hours): a case whose estimator would ask for more
    # distinct coalitions, or coalitions x whole-prompt tokens, than these gets kernel_shap within them, with a
    # warning. 4096 > exact at exact_max_n = 10 and > the default 8(n+1) up to n = 510; 4M tokens is 4096
    # coalitions of a 1,000-token prompt (about 2 h of SmolLM2 on 2 CPU cores before prefix sharing).
    c.max_case_coalitions = 4096
    c.max_case_tokens = 4_000_000
    c.batch_size = 16  # coalitions per forward (at most; chunks round up to powers of two); 16 pads least on CPU
    # KV cache + activations of one game call, in bytes (promed_jax.shapley.plan.MemoryModel): the coalitions
    # are cut into groups whose prefix trees fit. SmolLM2's process takes ~2.2 GB before the game (fp32 weights,
    # runtime, compiled executables, which grow with the shapes met) and peaks at ~1.5x the estimate above that:
    # at 2 GiB a 9-fact exact game peaked at 5.1 GB, so 1 GiB leaves room under 6 GB at any n up to 48.
    c.max_cache_bytes = 2**30
    # Compiled executables outlive a case (~20 MB each for SmolLM2 on CPU; each new shape adds one): when a case
    # starts with more than this many, all are dropped (shapes met again recompile), and the C heap is trimmed
    # before every case (promed_jax.shapley.memory.release). 0: drop them before every case.
    c.max_executables = 24
    c.seed = 0
    c.plot = False  # write a per-case bar chart of fact weights
    return c


def sampling_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.temperature = 0.7  # paper
    c.top_p = 1.0
    c.top_k = 0  # 0 = off
    c.max_new_tokens = 256  # paper: new tokens per turn
    c.repetition_penalty = 1.1  # paper
    c.no_repeat_ngram_size = 3  # paper: no repeated 3-grams
    c.max_dialogue_tokens = 8192  # paper: tokens per dialogue
    c.seed = 0
    return c


def mcts_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.iterations = 5  # paper: the reference run used 5 iterations per case
    c.c_uct = 2.2  # paper: UCT exploration constant
    c.max_children = 8  # paper: at most 8 children per node
    c.decay = 0.9  # paper: backup decay per level
    c.temperature = 0.7  # paper: expansion samples at 0.7
    c.correct_bonus = 2.0  # paper: optional +2 when the final answer is right
    c.use_correct_bonus = True
    # Search (promed_jax/mcts). 'paper_uct' (paper: Q + c*sqrt(ln N_parent / N), unvisited first) | 'muzero' |
    # 'gumbel_muzero' (mctx's selection rules, noise drawn per tree).
    c.policy = "paper_uct"
    c.expansion = "lazy"  # paper: a slot's turn is sampled when first chosen | 'eager': K candidates per new node
    c.leaf_value = "rollout"  # paper: a simulation goes on until the doctor answers (the policy finishes it; value =
    # its discounted return; the finished dialogue is exported) | 'zero': one doctor turn per simulation
    c.batch_trees = 8  # cases searched together: one sampler and one patient call per simulation for all of them
    c.max_state_bytes = 2**30  # host-side search state (dialogue texts per node) of one batch; over it stops the run
    c.seed = 0  # per-row sampling keys: (seed, case id, simulation, slot)
    # Selection for SFT ({workdir}/mcts/selected.jsonl): per case the top_k distinct dialogues by reward (0 = all)
    c.top_k = 1
    c.min_reward = 0.0  # ... with reward (sum of SIG + bonus) at least this ...
    c.require_correct = True  # ... and a right final answer
    return c


def sft_config() -> ml_collections.ConfigDict:
    """The paper's SFT settings are unknown (promed.md §3); these are ours."""
    c = ml_collections.ConfigDict()
    c.learning_rate = 1e-5
    c.batch_size = 4  # dialogues per optimizer step
    c.grad_accum = 1  # microbatches per step (batch_size / grad_accum rows each); the loss divides by all tokens
    c.epochs = 2
    c.max_tokens = 8192  # paper: tokens per dialogue; longer dialogues are left out (counted)
    c.buckets = (512, 1024, 2048, 4096)  # padded lengths (one compiled shape each), plus max_tokens
    c.warmup_steps = 10  # linear warmup, then cosine decay to final_lr_fraction * learning_rate
    c.final_lr_fraction = 0.1
    c.weight_decay = 0.0  # AdamW, on matrices only
    c.max_grad_norm = 1.0  # global-norm clipping; 0 = off
    c.vocab_chunk = 8192  # vocabulary columns per block of the chunked log-softmax
    c.eval_fraction = 0.1  # cases whose dialogues are held out for the eval loss (by a hash of the case id)
    c.eval_every = 20  # steps between held-out evaluations (and at the end)
    # 'naive': the scripted naive doctor's dialogues of the configured synthetic cases (the warm start);
    # 'topic': the scripted topic doctor's dialogues of the configured real cases (needs data.kind='files');
    # 'files': the dialogue files below (MCTS exports or any file of the export schema)
    c.source = "naive"
    c.dialogues = ()
    # the naive doctor asks findings until one is confirmed, at most this many; the topic doctor asks
    # 0..naive_max_questions facts per case
    c.naive_max_questions = 6
    c.seed = 0  # batch order, dropout keys and the naive doctor
    return c


def warm_start_config() -> ml_collections.ConfigDict:
    """The pipeline's warm start (promed_jax/training/warm_start.py): the SFT section's fields, its own budget.

    Defaults for the synthetic clinic with a fresh tiny model (full fine-tuning): 3 epochs of the naive
    doctor's dialogues and the answer-at-once examples of data.synthetic_n cases."""
    c = sft_config()
    c.learning_rate = 3e-3
    c.batch_size = 16
    c.epochs = 3
    c.warmup_steps = 20
    # The clinic tokenizer's dialogues: 130-530 tokens (a 6-question naive consultation ~520), so no bucket
    # pads one to twice its length.
    c.buckets = (128, 192, 256, 320, 384, 448, 512, 576)
    c.max_tokens = 640
    c.eval_every = 50
    c.eval_fraction = 0.05
    c.vocab_size = 1024  # model.kind='tiny': the BPE trained on the clinic's dialogues
    # source 'naive': synthetic cases the naive doctor consults (0 = data.synthetic_n); source 'topic': the
    # first `cases` of the configured split the topic doctor consults, in place of data.limit (0 = data.limit's)
    c.cases = 0
    c.naive_max_questions = 10  # the protocol's limit: the naive doctor asks the table in order up to it
    return c


def pipeline_config() -> ml_collections.ConfigDict:
    """mode='pipeline' (promed_jax/pipeline.py): what the end-to-end job adds to the stages' sections."""
    c = ml_collections.ConfigDict()
    # A Hugging Face folder (or a workdir / stage folder holding `model/`) to start from instead of training
    # the warm start; '' trains it.
    c.init_checkpoint = ""
    # Held-out cases of the six-doctor evaluation: the synthetic clinic's cases of eval_seed (disjoint from
    # data.synthetic_seed's), or the first eval_cases of the files' test split.
    c.eval_cases = 64
    c.eval_seed = 1
    # False: the "no Stage 1" ablation; no MCTS and no SFT, Stage 2 starts from the warm start
    c.stage1 = True
    # Where the keyed stage folders live ('' = {workdir}/stages); sweep points share one (promed_jax/pipeline.py)
    c.share_dir = ""
    return c


def grpo_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_generations = 4  # paper: G = 4 rollouts per case
    c.batch_cases = 2  # cases per rollout batch
    c.steps = 10
    c.alpha = 2.0  # paper: question tokens get alpha * SIG_k ...
    c.beta = 1.0  # paper: ... + beta * SIG_k * 1[correct]
    c.gamma = 3.0  # paper: answer tokens get gamma * 1[correct]
    c.format_reward_start = 1.0  # paper: the turn starts with `question:` / `answer:`
    c.format_reward_contains = 0.5  # paper: the turn only contains the marker
    c.clip_eps = 0.1  # paper: PPO-clip epsilon
    c.clip_eps_high = 0.0  # the upper clip epsilon ("clip-higher"); 0 = the same as clip_eps (the paper's)
    c.log_ratio_clamp = 20.0  # |log pi - log pi_old| and |log pi_ref - log pi| are clamped to this before exp
    c.kl_beta = 0.04  # paper
    c.kl_estimator = "k3"  # paper; 'k1' | 'k2' | 'k3' | 'none' (promed_jax.rl.losses)
    c.learning_rate = 5e-6  # paper
    c.optimizer = "adam"  # paper
    c.updates_per_batch = 1  # paper: one policy update per rollout batch
    # paper: 'token_mean' = reward - mean token reward of the group, no std normalisation;
    # 'traj_mean' = reward - the group's mean of per-dialogue mean token rewards (each dialogue counts once);
    # 'group_std' = GRPO's (R - mean) / std, used by the trajectory-level ablation; 'rloo' = leave-one-out
    c.advantage = "token_mean"
    # 'distributed' (paper) | 'trajectory' (ablation) | 'no_distribution' (ablation) | 'outcome_only' (no SIG)
    c.reward = "distributed"
    c.trajectory_correct_reward = 4.0  # paper (trajectory ablation): correctness 4
    c.trajectory_sig_scale = 2.0  # paper (trajectory ablation): + 2 * sum_i w_i c_i(T)
    # 'seq_mean_token_mean' (paper) = mean over doctor tokens per sequence, then sequences;
    # 'token_mean' = mean over all doctor tokens; 'seq_mean_token_sum_norm' = per-sequence sums / loss_norm_tokens
    c.loss_aggregation = "seq_mean_token_mean"
    c.loss_norm_tokens = 8192  # the constant of 'seq_mean_token_sum_norm' (ours: the paper's dialogue token limit)
    # Where Stage 2 starts: a Hugging Face folder, or a Stage 1 workdir / sft folder holding `model/`; '' takes
    # {workdir}/sft/model when it exists (the pipeline), else the `model` section. Fresh LoRA adapters go on top.
    c.init_checkpoint = ""
    c.minibatches = 1  # each of the updates_per_batch passes splits the rollout batch into this many steps
    c.grad_accum = 1  # microbatches per optimizer step (the loss divides by the whole minibatch's denominator)
    c.vocab_chunk = 8192  # vocabulary columns per block of the chunked log-softmax
    c.max_grad_norm = 1.0  # global-norm clipping; 0 = off
    c.weight_decay = 0.0  # with optimizer='adamw' only (paper: Adam)
    # Greedy held-out evaluation (`promed_jax.evaluation`, the `eval` section's decoding) before the first
    # batch, every eval_every batches and after the last (0 = never), on the first eval_cases cases
    # (0 = all) of eval_split; those cases never train.
    c.eval_every = 10
    c.eval_cases = 0
    c.eval_split = "dev"
    c.seed = 0  # case order, sampler keys, minibatch order, dropout
    return c


def mesh_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.shape = (-1,)  # -1 takes all remaining devices
    c.axis_names = ("data",)
    return c


def ckpt_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every_steps = 50
    c.max_to_keep = 3
    c.resume = True
    return c


def eval_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.modes = ("reactive", "proactive", "full")  # promed.md §1: reactive baseline, protocol, upper bound
    # (also "random": the random-N baseline doctor, synthetic clinic only; evaluation.evaluate.RANDOM)
    c.run = "default"  # results go to {workdir}/eval/<run>/<mode>.jsonl (promed.md §6)
    c.batch_size = 8  # cases consulted together (their live dialogues share each sampler call)
    # The doctor under evaluation: greedy and without penalties, so a re-run reproduces a run.
    c.temperature = 0.0
    c.max_new_tokens = 256  # per doctor turn
    c.repetition_penalty = 1.0
    c.no_repeat_ngram_size = 0
    c.seed = 0
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """All sections; `arg` picks a preset (see `apply_preset`). mode='data' prints the data statistics."""
    c = ml_collections.ConfigDict()
    c.mode = "data"  # 'data' | 'shapley' | 'mcts' | 'warm_start' | 'sft' | 'rl' | 'eval' | 'pipeline'
    c.preset = arg or "tiny"  # recorded in the pipeline's results
    c.model = model_config()
    c.data = data_config()
    c.consult = consult_config()
    c.patient = patient_config()
    c.backend = backend_config()
    c.shapley = shapley_config()
    c.sampling = sampling_config()
    c.mcts = mcts_config()
    c.sft = sft_config()
    c.warm_start = warm_start_config()
    c.grpo = grpo_config()
    c.pipeline = pipeline_config()
    c.mesh = mesh_config()
    c.ckpt = ckpt_config()
    c.eval = eval_config()
    apply_preset(c, arg)
    return c


def apply_preset(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Sets model and data for a preset: tiny (CPU default), smollm, qwen7b, llama8b."""
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown config preset {preset!r}; known: {', '.join(PRESETS)}")
    if preset == "tiny":
        c.model.kind = "tiny"
        c.data.kind = "synthetic"
        return c
    c.data.kind = "files"
    c.data.paths = (MEDQA_PATH,)
    c.data.on_error = "skip"
    if preset == "smollm":
        c.model.kind = "gguf"
        c.model.path = ""
    else:
        # paper: the doctor is Qwen2.5-7B-Instruct or Llama-3.1-8B-Instruct. Set model.path to the local
        # folder of the checkpoint (the code never downloads), e.g. --config.model.path=/models/Qwen2.5-7B-Instruct
        c.model.kind = "hf"
        c.model.path = ""
        c.model.dtype = "bfloat16"
        c.model.param_dtype = "bfloat16"
        c.model.remat = True
    return c
