"""CT data on disk: NIfTI reading and writing, case discovery, patient splits, converters.

  nifti.py      read_image / read_label / write_label / write_image, to_ras / from_ras
  discovery.py  find_cases: the LiTS and Decathlon layouts of a data root
  splits.py     split_cases: train / val / test by patient
  check.py      `python -m munet_jax.data.check ROOT`: validates every case of a root
  store.py      prepare_store / open_store: the memory-mapped slice store training reads
  prepare.py    `python -m munet_jax.data.prepare ROOT`: prepares a root's slice store
  pipeline.py   make_train_iterator: Grain batches of slices, sharded over processes
  batch_slots.py  reused shared-memory slots carrying batches out of the Grain workers
  ircadb.py     `python -m munet_jax.data.ircadb SRC OUT`: 3Dircadb-01 DICOM -> LiTS layout
  synthetic.py  `python -m munet_jax.data.synthetic`: a synthetic LiTS-layout data set
"""
