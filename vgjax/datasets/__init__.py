"""Tools that write datasets in the VG folder format (vgjax.data.vg_folder): `format` turns raw
downloads of the public datasets into the benchmark's folders, `from_photos` your own geotagged
photos into a split."""
