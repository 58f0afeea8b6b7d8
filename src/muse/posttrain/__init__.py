"""muse.posttrain: post-training stages as objectives on the one training loop (muse.train.loop).

start.py (where a stage starts: checkpoint, tokenizer, model config, sequence length),
sft.py (the SFT objective and its config), mixture.py (SFT data mixtures: chat files, task train splits,
identity, a share of pretraining text), taskscore.py (greedy task scores of a chat model),
preference.py (preference pairs), rm.py (the reward model and its reward function), dpo.py (DPO, IPO,
SimPO), rewards.py (the reward-function interface: verifiers, weighted sums), rollout.py (the paged engine
on the live policy weights), grpo.py (GRPO), constitution.py and rlaif.py (critique -> revise -> pairs).
"""
