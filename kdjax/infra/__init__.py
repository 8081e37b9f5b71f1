"""Infrastructure: every file read and write (local or gs://), meshes and hosts, host memory, the work folder's lease and
run log, and fetching the demo model. Imports nothing else of kdjax."""
