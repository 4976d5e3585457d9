"""`t2serve evaluate`: policies replayed on labelled pools (replay), compared at equal accuracy (comparison), scored on the test split (evaluate), each source held out (leave_one_out)."""
