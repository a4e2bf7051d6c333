"""cloud_service"""
