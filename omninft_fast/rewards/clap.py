"""CLAP text-audio alignment reward: cosine similarity of CLAP text and audio embeddings.

Loads a transformers ``ClapModel`` and its ``ClapProcessor`` (feature extractor + tokenizer) from a local
directory laid out as ``save_pretrained`` writes it (``config.json``, weights, ``preprocessor_config.json``,
tokenizer files), e.g. a downloaded ``laion/clap-htsat-unfused``.

The reward judges the audio against the audio prompt, so it is an ``audio`` reward: it routes to the audio
branch only. Audio is resampled to the extractor's rate and cut to its first ``max_length_s`` seconds before
feature extraction, so a clip always gets the same score (the extractor's random crops never run). Unfused
checkpoints get one mel view (``rand_trunc`` features), fused ones the four-view ``fusion`` features, every clip
through the fused path (what the extractor gives a batch of one), whatever its batch-mates.
"""

from __future__ import annotations

import torch

from omninft_fast.rewards._loading import WEIGHT_FILES, checkpoint_path, hf_from_pretrained, require_files
from omninft_fast.rewards.base import RewardBatch, RewardModel, register_reward
from omninft_fast.rewards.preprocess import resample


@register_reward("clap")
class ClapReward(RewardModel):
    """``{"clap": (B,)}`` cosine similarity in [-1, 1] between the audio and its prompt."""

    modality = "audio"
    release_files = (("config.json",), WEIGHT_FILES, ("preprocessor_config.json", "processor_config.json"))

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        from transformers import ClapModel, ClapProcessor

        path = checkpoint_path(self.checkpoint_dir, self.name)
        require_files(path, self.name, [], ["preprocessor_config.json", "processor_config.json"])
        self.model = hf_from_pretrained(ClapModel, path, self.name, self.dtype).to(self.device)
        self.processor = ClapProcessor.from_pretrained(str(path), local_files_only=True)

    def score(self, batch: RewardBatch) -> dict[str, torch.Tensor]:
        extractor = self.processor.feature_extractor
        rate = extractor.sampling_rate
        audio = resample(batch.audio.float(), batch.sample_rate, rate)[:, : extractor.nb_max_samples]
        features = extractor(
            [clip.double().cpu().numpy() for clip in audio],
            sampling_rate=rate,
            truncation="fusion" if self.model.config.audio_config.enable_fusion else "rand_trunc",
            return_tensors="pt",
        )
        tokens = self.processor.tokenizer(
            batch.prompts_for("audio"), padding=True, truncation=True, return_tensors="pt"
        ).to(self.device)
        text = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        # The extractor marks one clip of a batch at random as "longer" when none is (every clip is cut to the
        # maximum length here): one flag for all, as a batch of one always gets, keeps a clip's score its own.
        sound = self.model.get_audio_features(
            input_features=features["input_features"].to(self.device, self.dtype),
            is_longer=torch.ones(len(audio), 1, dtype=torch.bool, device=self.device),
        )
        return {"clap": (text.pooler_output.float() * sound.pooler_output.float()).sum(dim=-1)}
