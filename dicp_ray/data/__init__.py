"""Learning histories on disk and the training windows read from them (Arrow IPC shards + manifest).
Bottom layer: imports nothing else of dicp_ray.

    shards       the format: COLUMNS, shard_schema, write_shard, read_sidecar, shard_is_valid, write_manifest,
                 read_manifest, dataset_is_complete, SCHEMA_VERSION
    history      HistoryDataset (memory-mapped, checked), WindowSampler, WindowBatches
    idt_windows  both IDTs' windows (the release's): HistoryWindowSampler, sort_history
"""
