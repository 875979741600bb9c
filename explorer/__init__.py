"""PRISM Explorer: the Streamlit app (``streamlit run explorer/app.py``). Calls core only."""
