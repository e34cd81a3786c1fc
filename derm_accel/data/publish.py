"""Push a converted DatasetDict, its card and its conversion report to the Hugging Face Hub.

``DatasetDict.push_to_hub`` writes a README with ``dataset_info``/``configs`` metadata that the Hub viewer and
``load_dataset`` need; the card pushed afterwards keeps that metadata and adds ours (license, task, tags).
The token comes from the usual places (``HF_TOKEN``, ``hf auth login``) and is never printed or stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, HfApi

from derm_accel.data.card import card_body, card_data


def merged_card(existing: DatasetCard | None, report: dict[str, Any], *, title: str) -> DatasetCard:
    """Our card body with the Hub's metadata (dataset_info, configs) kept and ours laid over it."""
    metadata: dict[str, Any] = existing.data.to_dict() if existing is not None else {}
    metadata.update({k: v for k, v in card_data(report, pretty_name=title).to_dict().items() if v is not None})
    return DatasetCard(f"---\n{DatasetCardData(**metadata).to_yaml()}\n---\n\n{card_body(report, title=title)}")


def push_dataset(
    data_dir: str | Path, repo_id: str, report: dict[str, Any], *, title: str, private: bool | None = None
) -> str:
    """Upload the splits, then the card and ``conversion_report.json``; return the dataset's Hub URL."""
    from datasets import load_from_disk

    data_dir = Path(data_dir)
    dataset = load_from_disk(str(data_dir))
    commit = dataset.push_to_hub(repo_id, private=private, commit_message="Upload images converted by derm-accel")
    existing = DatasetCard.load(repo_id, repo_type="dataset")
    card = merged_card(existing, report, title=title)
    card.push_to_hub(repo_id, repo_type="dataset", commit_message="Dataset card from the conversion report")
    HfApi().upload_file(
        path_or_fileobj=str(data_dir / "conversion_report.json"),
        path_in_repo="conversion_report.json",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="Conversion report: every source file and what happened to it",
    )
    # The URL of the endpoint actually used (HF_ENDPOINT, a mirror), not a hard-coded huggingface.co one.
    return str(commit.repo_url)
