"""The whole of ProMed: warm start, Shapley cache, MCTS, SFT, SIG-augmented policy optimisation, evaluation.

`python -m promed_jax.main --config=configs/rl.py` is the README's main job (`promed_jax/pipeline.py`): the
warm start, Stage 1 and Stage 2 in one workdir, then six doctors on held-out cases, ending with
`{workdir}/pipeline/results.md` and a plot. `--config.mode=rl` runs Stage 2 alone (`promed_jax.rl.loop`) from `grpo.init_checkpoint` (a Stage 1 output
or a Hugging Face folder; '' = this workdir's Stage 1 output when there is one, else the `model` section).

Presets: tiny (the CPU default: a fresh 4-layer model warm-started on 512 synthetic cases' naive-doctor
dialogues, Stage 1 and 6 Stage 2 batches on 64 cases, 64 held-out cases), smollm (SmolLM2-135M, LoRA r = 8,
warm-started on the topic doctor's consultations of 96 MedQA training cases, Shapley, MCTS and 6 Stage 2
batches of 2 cases x G = 4 on 16 training cases, 50 test-split cases: a budget for 90 minutes on 2 CPU
cores), qwen7b / llama8b (the paper's doctors, for GPUs; below).

qwen7b (Qwen2.5-7B-Instruct) and llama8b (Llama-3.1-8B-Instruct): `--config.model.path=` a local Hugging Face
folder (required: without it the run stops with one `error:` line; nothing is downloaded), bf16 weights and
activations with remat, LoRA as the paper (r = 8, alpha = 32, dropout 0.1 on q_proj, v_proj), the paper's
Stage 1 and 2 settings (5 MCTS iterations, c = 2.2, G = 4, alpha = 2, beta = 1, gamma = 3, eps = 0.1, k3 KL at
0.04, Adam at 5e-6, one update per batch, T = 0.7, 256 tokens per turn, 8,192 per dialogue), and the patient
and the SIG judge (shapley.sig_mode='paper') on the OpenAI-compatible server of the `backend` section
(paper: Qwen2.5-72B-Instruct at T = 0.7; --config.backend.base_url=..., the key in $OPENAI_API_KEY).
Where the two models differ, the folder decides and the loader reads it (promed_jax/models/config.py,
text/tokenizer.py, backends/local.py); no config field overrides it:
  * chat template (tokenizer_config.json): Qwen2.5 is ChatML (`<|im_start|>role ... <|im_end|>`, a default
    system message "You are Qwen, created by Alibaba Cloud..."); Llama-3.1 uses header ids
    (`<|start_header_id|>role<|end_header_id|> ... <|eot_id|>`, a default system message with the knowledge
    and today's dates). text/dialogue.py finds the message bounds on the rendered text and stops with the
    message's index if a template is not prefix-stable (neither model's was tried here: no 7-8B folder).
  * EOS ids: the sampler stops on the tokenizer's eos_token and on `<|im_end|>` where the vocabulary has it:
    Qwen2.5 `<|im_end|>` (151645; pad `<|endoftext|>`); Llama-3.1-Instruct `<|eot_id|>` (128009; no pad token,
    so pad = eos). A Llama folder whose eos_token is `<|end_of_text|>` (the base model's) does not stop at `<|eot_id|>`.
  * rope (config.json): Qwen2.5 theta 1e6, no scaling, 32,768 positions, vocabulary 152,064 (22 chunks of
    6,912 in the chunked log-softmax); Llama-3.1 theta 5e5 with `llama3` scaling (factor 8, 8,192 original
    positions), 131,072 positions, vocabulary 128,256 (16 chunks of 8,016).
What the config does set per model is its memory: the microbatches of an 8,192-token dialogue (Llama's
hidden size 4,096 and 32 layers against Qwen's 3,584 and 28 keep ~1.3x the activations per token under remat;
the microbatch sizes are a margin, not measured). Microbatches change memory only: the loss divides by the
whole minibatch's denominator.
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config(arg)
    c.mode = "pipeline"
    preset = arg or "tiny"
    if preset == "tiny":
        # The embedded default (promed_jax/pipeline.py): a fresh 4-layer, 128-wide model, warm-started on the
        # synthetic clinic's naive doctor (warm_start section), fully fine-tuned in every stage.
        c.model.tiny.hidden_size = 128
        c.model.tiny.intermediate_size = 256
        c.model.tiny.num_layers = 4
        c.model.tiny.head_dim = 32
        c.model.tiny.max_position_embeddings = 2048
        c.model.lora_rank = 0
        c.warm_start.cases = 512  # the warm start's naive consultations; the later stages train on 64 cases
        c.warm_start.epochs = 2
        c.data.synthetic_n = 64
        c.patient.kind = "fact_select"  # the clinic's facts are asked in their own words
        c.mcts.batch_trees = 32
        c.sft.learning_rate = 1e-3
        c.sft.batch_size = 8
        c.sft.epochs = 2
        c.sft.buckets = (256, 384, 512, 768)
        c.sft.max_tokens = 1024
        c.grpo.steps = 6
        c.grpo.batch_cases = 4
        c.grpo.learning_rate = 1e-4
        c.grpo.eval_every = 0  # the pipeline's evaluation follows
        c.sampling.max_new_tokens = 96  # a clinic turn is < 40 tokens of the clinic's BPE
        c.sampling.max_dialogue_tokens = 2048
        c.eval.max_new_tokens = 96
        c.eval.batch_size = 48
        c.pipeline.eval_cases = 48  # with 64 the whole run took 10.5 min (629 s) on 2 cores
    elif preset == "smollm":
        # The 90-minute CPU budget (issue 14; README, Presets): SmolLM2-135M with LoRA r = 8 on MedQA.
        # Warm start: the scripted topic doctor's consultations of the first 96 training-split cases (their
        # SmolLM2 dialogues are 450 tokens at the median, 570 at p90, < 1,000: experiments/topic_doctor.py).
        c.warm_start.source = "topic"
        c.warm_start.cases = 96
        c.warm_start.learning_rate = 3e-4
        c.warm_start.batch_size = 4
        c.warm_start.grad_accum = 2
        c.warm_start.epochs = 2
        c.warm_start.warmup_steps = 5
        c.warm_start.buckets = (512, 640, 768, 1024)
        c.warm_start.max_tokens = 1536
        c.warm_start.eval_every = 16
        c.warm_start.naive_max_questions = 6  # the topic doctor asks 0..6 facts per case (configs/sft.py:smollm)
        # Shapley, MCTS and Stage 2 on the first 16 training cases; Shapley also on the 50 held-out cases.
        c.data.limit = 16
        c.shapley.exact_max_n = 6
        c.shapley.budget_per_fact = 4
        c.mcts.batch_trees = 16  # 5 simulations, each finishing its dialogue (leaf_value 'rollout')
        c.mcts.top_k = 2
        c.sft.learning_rate = 2e-4
        c.sft.batch_size = 4
        c.sft.grad_accum = 2
        c.sft.epochs = 2
        c.sft.warmup_steps = 2
        c.sft.buckets = (512, 640, 768, 1024, 1536)
        c.sft.max_tokens = 2048
        c.sft.eval_every = 50  # at the end only
        c.grpo.steps = 6
        c.grpo.learning_rate = 5e-5  # fresh LoRA adapters for 6 batches (the paper's 5e-6 is for 500)
        c.grpo.eval_every = 0  # the pipeline's evaluation follows
        c.grpo.vocab_chunk = 8192  # SmolLM2's 49,152 columns in 6 blocks
        c.grpo.grad_accum = 8  # one dialogue per microbatch
        # A MedQA turn of the warm start is < 40 tokens and a consultation < 2,000: 64 new tokens per turn,
        # 4,096 per dialogue (the paper's 256 and 8,192 are for 7-8B doctors that reason before asking).
        c.sampling.max_new_tokens = 64
        c.sampling.max_dialogue_tokens = 4096
        c.eval.max_new_tokens = 96
        c.eval.batch_size = 16
        c.pipeline.eval_cases = 50
    elif preset == "qwen7b":
        _paper_gpu(c)
        c.grpo.grad_accum = 8  # 32 dialogues of up to 8,192 tokens: 4 per microbatch
    elif preset == "llama8b":
        _paper_gpu(c)
        c.grpo.grad_accum = 16  # 2 dialogues per microbatch: ~1.3x Qwen's activations per token (docstring)
    return c


def _paper_gpu(c: ml_collections.ConfigDict) -> None:
    """What qwen7b and llama8b share: the paper's settings on a GPU mesh, patient and judge on the server."""
    c.grpo.steps = 500
    c.grpo.batch_cases = 8
    c.grpo.eval_every = 50
    c.mcts.batch_trees = 32
    c.patient.kind = "openai"  # paper: Qwen2.5-72B-Instruct behind an OpenAI-compatible API (backend section)
    c.shapley.sig_mode = "paper"  # an LLM patient paraphrases: the understanding model + judge (the server)
    c.mesh.shape = (1, -1)
    c.mesh.axis_names = ("data", "fsdp")


def sweep(add) -> None:
    """The paper's method and its ablations (promed.md §4), one per point."""
    add(**{"grpo.reward": "distributed", "shapley.weighting": "shapley"})
    add(**{"grpo.reward": "trajectory", "grpo.advantage": "group_std"})  # trajectory-level reward, GRPO's baseline
    add(**{"shapley.weighting": "uniform"})  # no Shapley weighting
    add(**{"grpo.reward": "no_distribution"})  # no reward distribution over turns
    add(**{"grpo.reward": "outcome_only"})  # correctness and format only, no SIG
    add(**{"pipeline.stage1": False})  # no Stage 1: Stage 2 from the warm start
    add(**{"shapley.tau": 0.5})  # sharper fact weights than the paper's tau = 2
    add(**{"shapley.tau": 0.1})
    add(**{"grpo.advantage": "traj_mean"})  # each dialogue counts once in the baseline
