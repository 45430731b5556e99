"""AutoML's datasets routes: create, get, list, delete, importData, annotation specs, and the
label stats sidecar (``GET .../datasets/ID:labelStats``: what AutoML's Dataset message has no
room for). Each through trainer/datasets.py, as the `datasets` verbs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from trainer import datasets
from trainer.server.errors import ApiError
from trainer.server.messages import (
    listed,
    message_types,
    parent_name,
    parent_of,
    parsed_body,
)
from trainer.store.automl import field_name
from trainer.tasks import dataset_format, task_configs


def _task_of(dataset: Any) -> tuple[str, str | None]:
    """The task a Dataset message's metadata field names, and its classification type."""
    oneof = type(dataset).pb(dataset).WhichOneof("dataset_metadata")
    for task in task_configs():
        key = dataset_format(task).metadata_key
        if oneof == field_name(key):
            metadata = getattr(dataset, oneof)
            kind = getattr(metadata, "classification_type", None)
            return task, (kind.name if kind else None)
    raise ApiError("INVALID_ARGUMENT", "give the dataset an imageClassificationDatasetMetadata "
                   "or imageObjectDetectionDatasetMetadata (v1beta1: videoClassificationDataset"
                   "Metadata)")  # fmt: skip


def add_dataset_routes(router: APIRouter, service: Any, base: str) -> None:  # noqa: C901
    workspace = service.workspace

    @router.post(base + "/datasets")
    async def create_dataset(project: str, location: str, request: Request) -> dict[str, Any]:
        parent = parent_of(project, location)
        dataset = await parsed_body(request, message_types(request).Dataset)
        task, kind = _task_of(dataset)
        created = datasets.create_dataset(workspace, dataset.display_name, task, kind,
                                          dataset.description, parent)  # fmt: skip
        return created.operation or created.dataset  # v1beta1's CreateDataset is no operation

    @router.get(base + "/datasets")
    def list_datasets(project: str, location: str) -> dict[str, Any]:
        prefix = parent_name(parent_of(project, location)) + "/"
        found = [d for d in datasets.list_datasets(workspace) if d["name"].startswith(prefix)]
        return listed("datasets", found, "")

    @router.get(base + "/datasets/{dataset_id}:labelStats")
    def label_stats(project: str, location: str, dataset_id: str) -> dict[str, Any]:
        name = parent_of(project, location).name("datasets", dataset_id)
        return datasets.label_stats(workspace, name)

    @router.get(base + "/datasets/{dataset_id}")
    def get_dataset(project: str, location: str, dataset_id: str) -> dict[str, Any]:
        name = parent_of(project, location).name("datasets", dataset_id)
        return datasets.get_dataset(workspace, name)

    @router.delete(base + "/datasets/{dataset_id}")
    def delete_dataset(project: str, location: str, dataset_id: str) -> dict[str, Any]:
        name = parent_of(project, location).name("datasets", dataset_id)
        return datasets.delete_dataset(workspace, name)

    @router.post(base + "/datasets/{dataset_id}:importData")
    async def import_data(
        project: str, location: str, dataset_id: str, request: Request
    ) -> dict[str, Any]:
        name = parent_of(project, location).name("datasets", dataset_id)
        asked = await parsed_body(request, message_types(request).ImportDataRequest)
        uris = list(asked.input_config.gcs_source.input_uris)
        if not uris:
            raise ApiError("INVALID_ARGUMENT", "inputConfig.gcsSource.inputUris: give a CSV")
        field = "inputConfig.gcsSource.inputUris"
        paths = [str(service.roots.readable(uri, field)) for uri in uris]
        datasets.get_dataset(workspace, name)  # NOT_FOUND before anything starts
        return datasets.begin_import(workspace, name, paths)

    @router.post(base + "/datasets/{dataset_id}:exportData")
    def export_data(project: str, location: str, dataset_id: str) -> None:
        raise ApiError("UNIMPLEMENTED", "exportData is not offered: a dataset's rows are the "
                       "CSV files it was imported from")  # fmt: skip

    @router.get(base + "/datasets/{dataset_id}/annotationSpecs/{spec_id}")
    def get_annotation_spec(
        project: str, location: str, dataset_id: str, spec_id: str
    ) -> dict[str, Any]:
        dataset = parent_of(project, location).name("datasets", dataset_id)
        return datasets.get_annotation_spec(workspace, f"{dataset}/annotationSpecs/{spec_id}")
